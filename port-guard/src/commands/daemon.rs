//! `port-guard daemon`: the flags become the policy's overrides; [`crate::daemon`] does the rest.

use std::path::Path;

use anyhow::Result;

use crate::{cli::DaemonArgs, config::Overrides, daemon, pin::PinDir};

pub fn run(pin: &PinDir, config: Option<&Path>, args: DaemonArgs) -> Result<()> {
    let protect_ephemeral = match (args.protect_ephemeral, args.no_protect_ephemeral) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let source = daemon::Source {
        config,
        flags: Overrides {
            attach: args.attach,
            reserve: args.reserve,
            allow: args.allow,
            mode: args.mode,
            errno: args.errno,
            protect_ephemeral,
            allow_fallback: args.allow_fallback,
            spawn_parent: args.spawn_parent,
            netns: args.netns,
            sentinel_port: args.sentinel_port,
            per_child_limit: args.per_child_limit,
            metrics_listen: args.metrics_listen,
            metrics_textfile: args.metrics_textfile,
        },
    };
    daemon::run(pin, source, args.unload_on_exit)
}
