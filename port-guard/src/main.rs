use std::{io::Write as _, process::ExitCode};

use clap::{CommandFactory as _, Parser as _};
use port_guard::{
    cli::{Cli, Command},
    commands,
    error::ExitStatus as _,
    pin::PinDir,
};

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, joined.
            eprintln!("port-guard: {e:#}");
            ExitCode::from(e.exit_status())
        }
    }
}

/// The command line; else clap's answer, printed, and the status to exit with.
fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
        // Clap's usage errors whole: the missing arguments, the "did you mean" hint and the
        // usage line are what a user needs to fix the call (only port-guard's own errors are one
        // line).
        let _ = e.print();
        ExitCode::from(2)
    })
}

/// Runs the verb. `status` and `check` say how it went in their exit status; the others exit 0
/// when they succeed.
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let pin = PinDir::new(&cli.pin_dir);
    let config = cli.config.as_deref();
    let done = match cli.command {
        Command::Status {
            json,
            prometheus,
            textfile,
        } => {
            let out = commands::status::Output::of(json, prometheus, textfile);
            return commands::status::run(&pin, config, out);
        }
        Command::Check { json } => return commands::check::run(&pin, config, json),
        Command::Daemon(args) => commands::daemon::run(&pin, config, args),
        Command::Unload { forget_unreachable } => commands::unload::run(&pin, forget_unreachable),
        Command::Reload { timeout } => commands::reload::run(&pin, timeout),
        Command::Man => man(),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "port-guard",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Spawn {
            name,
            port,
            count,
            json,
            cmd,
        } => commands::spawn::run(
            &pin,
            commands::spawn::SpawnArgs {
                name,
                port,
                count: count.into(),
                json,
                cmd,
            },
        ),
        Command::Lease {
            cgroup,
            port,
            count,
            ttl,
            until_empty,
            renew,
            json,
        } => {
            let terms = commands::lease::Terms {
                ttl_secs: ttl,
                until_empty,
            };
            if renew {
                commands::lease::renew(&pin, &cgroup, port, terms, json)
            } else {
                commands::lease::lease(&pin, &cgroup, port, count.into(), terms, json)
            }
        }
        Command::Release { port, cgroup } => {
            commands::lease::release(&pin, port, cgroup.as_deref())
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

fn man() -> anyhow::Result<()> {
    std::io::stdout().write_all(&port_guard::manpage::render()?)?;
    Ok(())
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    // aya's own loader chatter (relocations, and a multi-line dump when the kernel refuses the
    // object's BTF, which these programs do not need) only with -vv.
    let aya_level = if verbose >= 2 {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Error
    };
    let journal = stderr_is_journal();
    env_logger::Builder::new()
        .filter_level(level)
        .filter_module("aya", aya_level)
        .filter_module("aya_obj", aya_level)
        .parse_default_env()
        .format(move |buf, record| {
            if journal {
                // The journal keeps the time; the prefix sets the priority, so that
                // `journalctl -p warning` shows denials and errors.
                writeln!(buf, "<{}>{}", priority(record.level()), record.args())
            } else {
                writeln!(
                    buf,
                    "{} {:<5} {}",
                    buf.timestamp_millis(),
                    record.level(),
                    record.args()
                )
            }
        })
        .init();
}

/// The syslog priority of a log level (sd-daemon.h's SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG).
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether stderr is connected to the journal: systemd sets JOURNAL_STREAM to the device and
/// inode of the stream it gave the service, and stderr is still that stream.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let v = v.to_string_lossy();
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    // SAFETY: zeroed is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd 2 and a valid out pointer.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev == st.st_dev.to_string() && ino == st.st_ino.to_string()
}
