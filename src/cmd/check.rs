//! `--check-config`: a part's flags and environment, parsed and checked as at start-up, without
//! opening a port, etcd or the model's weights. Deployments (the Helm chart's tests) run it on
//! exactly the arguments and variables of their containers, so that a renamed flag or variable
//! fails there rather than in a cluster.

use std::path::Path;

use anyhow::Result;

use super::UsageError;

/// Variables read by every part, outside clap: the log filter.
const READ_BY_ALL: &[&str] = &["MOEBIUS_LOG"];

/// The `MOEBIUS_*` variables in `vars` that subcommand `name` of `cli` does not read; a
/// misspelt or renamed one would otherwise be ignored without a word.
pub fn unread_variables(
    cli: &clap::Command,
    name: &str,
    vars: impl Iterator<Item = String>,
) -> Vec<String> {
    let read: Vec<String> = cli
        .get_arguments()
        .chain(
            cli.find_subcommand(name)
                .into_iter()
                .flat_map(clap::Command::get_arguments),
        )
        .filter_map(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .chain(READ_BY_ALL.iter().map(|v| (*v).to_owned()))
        .collect();
    let mut unread: Vec<String> = vars
        .filter(|v| v.starts_with("MOEBIUS_") && !read.contains(v))
        .collect();
    unread.sort();
    unread
}

/// Refuses `MOEBIUS_*` variables of this process's environment that `name` does not read.
pub fn environment(cli: &clap::Command, name: &str) -> Result<()> {
    let unread = unread_variables(cli, name, std::env::vars().map(|(k, _)| k));
    if unread.is_empty() {
        return Ok(());
    }
    Err(UsageError(format!(
        "`moebius {name}` reads no variable named {}",
        unread.join(", ")
    ))
    .into())
}

/// How a summary names a secret file a part reads: `what (checked)` when the file is here and
/// `read` accepts it, `what (file not here; not checked)` when a deployment mounts it only in
/// the running container, `absent` without the flag.
pub fn secret_file<T, E: Into<anyhow::Error>>(
    path: Option<&Path>,
    what: &str,
    absent: &str,
    read: impl FnOnce(&Path) -> std::result::Result<T, E>,
) -> Result<String> {
    Ok(match path {
        Some(path) if path.exists() => {
            read(path).map_err(Into::into)?;
            format!("{what} (checked)")
        }
        Some(_) => format!("{what} (file not here; not checked)"),
        None => absent.to_owned(),
    })
}

/// How a summary names the model directory: whether its config.json is here.
pub fn model(dir: &Path) -> String {
    if dir.join("config.json").exists() {
        format!("{} (present)", dir.display())
    } else {
        format!("{} (not here; not checked)", dir.display())
    }
}

/// Runs `--check-config` for `command`: exit 0 with a summary line, or the problem.
pub fn run(cli: &clap::Command, command: &crate::Command) -> Result<()> {
    let (name, summary) = match command {
        crate::Command::Worker(args) => ("worker", super::worker::check(args)),
        crate::Command::Router(args) => ("router", super::router::check(args)),
        crate::Command::Coordinator(args) => ("coordinator", super::coordinator::check(args)),
        _ => {
            return Err(UsageError(
                "--check-config applies to `moebius worker`, `router` and `coordinator`".into(),
            )
            .into())
        }
    };
    environment(cli, name)?;
    // Whatever is wrong here is the deployment's to fix: exit 2, as for bad flags.
    let summary = summary.map_err(|e| UsageError(format!("{e:#}")))?;
    println!("configuration ok: {summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn variables_another_part_reads_are_unread_by_this_one() {
        let cli = crate::Cli::command();
        let vars = [
            "MOEBIUS_WORKER_CAPACITY",
            "MOEBIUS_ETCD",
            "MOEBIUS_LOG",
            "MOEBIUS_LOG_FORMAT",
            "MOEBIUS_ROUTER_LISTEN",
            "MOEBIUS_WORKER_CAPACITTY",
            "PATH",
        ]
        .map(String::from);
        assert_eq!(
            unread_variables(&cli, "worker", vars.clone().into_iter()),
            ["MOEBIUS_ROUTER_LISTEN", "MOEBIUS_WORKER_CAPACITTY"]
        );
        assert_eq!(
            unread_variables(&cli, "router", vars.into_iter()),
            ["MOEBIUS_WORKER_CAPACITTY", "MOEBIUS_WORKER_CAPACITY"]
        );
    }
}
