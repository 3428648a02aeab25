//! The config file and flags, parsed: examples that must work and values that must not.
use super::*;

fn parse(text: &str) -> Result<Policy, ConfigError> {
    let path = Path::new("/etc/port-guard/config.toml");
    let file = ConfigFile::parse(path, text)?;
    build_policy(&file, Some(path), &Overrides::default())
}

const SPEC_EXAMPLE: &str = r#"
attach = "/"
mode = "enforce"            # "audit": log what would be denied, deny nothing
errno = "eaddrinuse"        # what a refused bind() returns: eperm | eacces | eaddrinuse
protect_ephemeral = true    # default true: keep the kernel from auto-picking reserved ports (ip_local_reserved_ports)
netns = ["host"]            # where the guard enforces: "host" (the daemon's netns), "all", or netns paths
spawn_parent = "/port-guard"

[[reserve]]
ports = "49152-49215"       # libvirt's migration_port_min..migration_port_max
protocols = ["tcp"]
allow = ["/machine.slice", "/system.slice/libvirtd.service", "/system.slice/virtqemud.service"]
"#;

#[test]
fn parses_the_spec_example() {
    let p = parse(SPEC_EXAMPLE).unwrap();
    assert_eq!(p.attach, CgroupPath::root());
    assert_eq!(p.errno, Errno::Eaddrinuse);
    assert!(p.protect_ephemeral);
    assert_eq!(p.reserve.len(), 1);
    assert_eq!(p.reserve[0].spec, DEFAULT_RESERVE);
    assert_eq!(p.reserve[0].allow.len(), 3);
}

#[test]
fn the_libvirt_example_parses_to_what_docs_libvirt_md_says() {
    let path = Path::new("contrib/libvirt-host.toml");
    let text = include_str!("../../../contrib/libvirt-host.toml");
    let file = ConfigFile::parse(path, text).unwrap();
    let p = build_policy(&file, Some(path), &Overrides::default()).unwrap();
    assert_eq!(p.errno, Errno::Eaddrinuse);
    assert!(p.protect_ephemeral);
    assert_eq!(p.attach, CgroupPath::root());
    assert_eq!(p.reserve.len(), 1);
    assert_eq!(p.reserve[0].spec, DEFAULT_RESERVE);
    let allow: Vec<&str> = p.reserve[0].allow.iter().map(CgroupPath::as_str).collect();
    assert_eq!(
        allow,
        [
            "/machine.slice",
            "/system.slice/libvirtd.service",
            "/system.slice/virtqemud.service"
        ]
    );
    // docs/libvirt.md shows the same settings.
    let doc = include_str!("../../../docs/libvirt.md");
    for line in [
        "errno = \"eaddrinuse\"",
        "ports = \"49152-49215\"",
        "allow = [\"/machine.slice\", \"/system.slice/libvirtd.service\", \"/system.slice/virtqemud.service\"]",
    ] {
        assert!(doc.contains(line) && text.contains(line), "{line}");
    }
}

#[test]
fn huge_configs_are_refused_whole_not_truncated() {
    let path = Path::new("/big.toml");
    let ranges: String = (0..100_000u32)
        .map(|i| format!("[[reserve]]\nports = \"{}\"\n", 1 + i % 65535))
        .collect();
    let e = build_policy(
        &ConfigFile::parse(path, &ranges).unwrap(),
        Some(path),
        &Overrides::default(),
    )
    .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::new(e));
    assert!(msg.contains("100000 reserved ranges"), "{msg}");
    let allow: Vec<String> = (0..100_000).map(|i| format!("\"/c{i}\"")).collect();
    let text = format!(
        "[[reserve]]\nports = \"1000\"\nallow = [{}]\n",
        allow.join(",")
    );
    let e = build_policy(
        &ConfigFile::parse(path, &text).unwrap(),
        Some(path),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(format!("{:#}", anyhow::Error::new(e))
        .contains("100000 allowed cgroups configured; at most 4096"));
}

#[test]
fn defaults_without_file_or_flags() {
    let p = build_policy(&ConfigFile::default(), None, &Overrides::default()).unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(
        p.reserve,
        vec![Reservation {
            per_child_limit: 0,
            spec: DEFAULT_RESERVE,
            allow: vec![]
        }]
    );
    assert_eq!(p.spawn_parent.as_str(), DEFAULT_SPAWN_PARENT);
    assert!(
        p.protect_ephemeral,
        "ephemeral ports are protected by default"
    );
}

#[test]
fn netns_from_the_file_or_the_flags() {
    use crate::policy::NetnsSpec;
    let path = Path::new("/c.toml");
    let p = build_policy(&ConfigFile::default(), None, &Overrides::default()).unwrap();
    assert_eq!(p.netns, NetnsScope::Listed(vec![NetnsSpec::Host]));
    let file = ConfigFile::parse(path, "netns = [\"host\", \"/run/netns/b\"]").unwrap();
    let p = build_policy(&file, Some(path), &Overrides::default()).unwrap();
    assert_eq!(p.netns.specs().len(), 2);
    let flags = Overrides {
        netns: vec!["all".into()],
        ..Default::default()
    };
    assert_eq!(
        build_policy(&file, Some(path), &flags).unwrap().netns,
        NetnsScope::All
    );
    let bad = ConfigFile::parse(path, "netns = [\"all\", \"host\"]").unwrap();
    let e = build_policy(&bad, Some(path), &Overrides::default()).unwrap_err();
    assert!(format!("{:#}", anyhow::Error::new(e)).contains("list it alone"));
}

#[test]
fn ephemeral_protection_is_turned_off_only_explicitly() {
    let path = Path::new("/c.toml");
    let off = ConfigFile::parse(path, "protect_ephemeral = false").unwrap();
    let p = build_policy(&off, Some(path), &Overrides::default()).unwrap();
    assert!(!p.protect_ephemeral);
    let flags = Overrides {
        protect_ephemeral: Some(true),
        ..Default::default()
    };
    assert!(
        build_policy(&off, Some(path), &flags)
            .unwrap()
            .protect_ephemeral
    );
    let flags = Overrides {
        protect_ephemeral: Some(false),
        ..Default::default()
    };
    let p = build_policy(&ConfigFile::default(), None, &flags).unwrap();
    assert!(!p.protect_ephemeral);
}

#[test]
fn flags_override_the_file() {
    let path = Path::new("/c.toml");
    let file = ConfigFile::parse(path, SPEC_EXAMPLE).unwrap();
    let flags = Overrides {
        reserve: vec!["61000-61009/udp".into(), "61010".into()],
        allow: vec!["/a".into()],
        mode: Some("audit".into()),
        ..Default::default()
    };
    let p = build_policy(&file, Some(path), &flags).unwrap();
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.reserve.len(), 2);
    assert!(p
        .reserve
        .iter()
        .all(|r| r.allow == vec!["/a".parse().unwrap()]));
}

#[test]
fn rejects_bad_files_with_one_line_naming_the_value() {
    for (text, needle) in [
        ("colour = \"red\"", "colour"),
        ("mode = \"block\"", "block"),
        ("errno = \"enoent\"", "enoent"),
        ("attach = \"/a/../b\"", "/a/../b"),
        ("[[reserve]]\nports = \"0\"", "\"0\""),
        ("[[reserve]]\nports = \"70000\"", "70000"),
        ("[[reserve]]\nports = \"10-5\"", "10-5"),
        (
            "[[reserve]]\nports = \"10\"\nprotocols = [\"sctp\"]",
            "sctp",
        ),
        ("[[reserve]]\nports = \"10\"\nprotocols = []", "no protocol"),
        ("[[reserve]]\nports = \"10\"\nallow = [\"x\"]", "\"x\""),
        ("[[reserve]]\nports = \"10\"\ncolour = 1", "colour"),
        (
            "[[reserve]]\nports = \"10-20\"\n[[reserve]]\nports = \"20-30\"",
            "overlap",
        ),
        (
            "[[reserve]]\nports = \"10\"\nallow = [\"/a\", \"/a/\"]",
            "twice",
        ),
        ("mode = 3", "mode"),
        // Found by fuzzing: a message of toml's own that spans two lines.
        ("[''", "invalid table header"),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.exit_status(), crate::error::EXIT_USAGE);
        // As main prints it: the error and its causes on one line.
        let msg = format!("{:#}", anyhow::Error::new(e));
        assert!(msg.contains(needle), "{text:?}: {msg}");
        assert!(!msg.contains('\n'), "{text:?}: {msg}");
    }
}
