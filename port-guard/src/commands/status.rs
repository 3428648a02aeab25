use anyhow::Result;

use crate::{
    cgroup::Cgroup2,
    pin::PinDir,
    status::{self, Status},
};

pub fn run(pin: &PinDir, json: bool) -> Result<()> {
    let cg = Cgroup2::find()?;
    let s = status::status(pin, &cg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render(&s));
    }
    Ok(())
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Where the guard enforces, for the table.
fn netns(s: &Status) -> String {
    if !s.netns.scoped {
        return "all (every network namespace)".into();
    }
    if s.netns.guarded.is_empty() {
        return "none present yet (binds are checked nowhere)".into();
    }
    s.netns
        .guarded
        .iter()
        .map(|n| format!("{} (inode {})", n.name, n.inode))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human table.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let errno = if s.errno == s.effective_errno {
        s.errno.to_owned()
    } else {
        format!("{} (this kernel gives {})", s.errno, s.effective_errno)
    };
    out += &format!(
        "guard:     {}\npin dir:   {}\nattach:    {}\nnetns:     {}\nmode:      {}\nerrno:     {}\nephemeral: {}\nspawn:     {}\n",
        if s.attached { "attached" } else { "NOT ATTACHED: binds are not checked" },
        s.pin_dir.display(),
        s.attach,
        netns(s),
        s.mode,
        errno,
        if s.protect_ephemeral { "protected" } else { "not protected" },
        if s.spawn_parent.is_empty() { "-" } else { &s.spawn_parent },
    );
    for d in &s.disagreements {
        out += &format!("  ! {d}\n");
    }
    out += &format!(
        "\n{:<13} {:<8} {:>8} {:>8} {:>8}  {}\n",
        "RANGE", "PROTO", "ALLOWED", "DENIED", "AUDITED", "ALLOWED CGROUPS"
    );
    for r in &s.reserve {
        out += &format!(
            "{:<13} {:<8} {:>8} {:>8} {:>8}  {}\n",
            r.ports,
            r.protocols.join("+"),
            r.counters.allowed,
            r.counters.denied,
            r.counters.audited,
            if r.allow.is_empty() {
                "-".to_owned()
            } else {
                r.allow.join(", ")
            },
        );
    }
    if s.netns.unguarded_binds > 0 {
        out += &format!(
            "({} binds of reserved ports in network namespaces the guard does not enforce in, let through)\n",
            s.netns.unguarded_binds
        );
    }
    if s.events_lost > 0 {
        out += &format!(
            "({} denials were not reported: the event ring buffer was full)\n",
            s.events_lost
        );
    }
    out += &format!("\n{:<6} {:>8}  {}\n", "LEASE", "AGE", "CGROUP");
    if s.leases.is_empty() {
        out += "(none)\n";
    }
    for l in &s.leases {
        out += &format!("{:<6} {:>8}  {}\n", l.port, age(l.age_secs), l.cgroup);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(65), "1m05s");
        assert_eq!(age(7260), "2h01m");
        assert_eq!(age(90000), "1d01h");
    }
}
