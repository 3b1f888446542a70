//! `privlink check --config agent.toml [--destination H:P]... [--no-tls] [--json]`: runs the agent's
//! diagnostics (`privlink_agent::check`) and prints one line per step with its time, warnings
//! under it, or everything as one JSON object; `--endpoint NAME:PORT [--ca F] [--relay H]`
//! (with or without a configuration) adds the client's side. Exit 0 when nothing failed
//! (warnings allowed), 69 when a step failed, 64 for an invalid configuration.

use std::path::Path;
use std::time::Instant;

use privlink_agent::check::endpoint::EndpointCheck;
use privlink_agent::check::{self, CheckOptions, Outcome, Report, Step};
use serde_json::json;

use super::{ConfigShown, Unavailable};

/// `env_token` is `PRIVLINK_TOKEN`, already taken out of the environment; `endpoints` are the
/// client-side checks (`--endpoint`), run after the configuration's, if any.
pub(crate) async fn run(
    config_path: Option<&Path>,
    env_token: Option<String>,
    options: CheckOptions,
    endpoints: Vec<EndpointCheck>,
    json: bool,
) -> anyhow::Result<()> {
    // Steps are printed as they complete, so a slow one shows where the time goes.
    let mut report = if json { Report::default() } else { Report::observed(print_step) };
    let started = Instant::now();
    let shown = config_path.map_or_else(|| "-".to_owned(), |p| p.display().to_string());
    if !json {
        println!("privlink check: {shown}");
    }
    if let Some(config_path) = config_path {
        let config = match privlink_agent::AgentConfig::load(config_path, env_token) {
            Ok(config) => config,
            Err(error) => {
                report.push(Step::new(
                    "config",
                    config_path.display().to_string(),
                    Outcome::Fail,
                    started.elapsed(),
                    error.to_string(),
                ));
                if json {
                    print_json(&shown, &report);
                }
                return Err(ConfigShown.into());
            }
        };
        report.push(check::config_step(config_path, &config, started.elapsed()));
        check::run(&config, &options, &mut report).await;
    }
    for endpoint in &endpoints {
        check::endpoint::run(endpoint, &mut report).await;
    }
    if json {
        print_json(&shown, &report);
    } else {
        println!(
            "{} passed, {} with warnings, {} failed",
            report.count(Outcome::Pass),
            report.count(Outcome::Warn),
            report.count(Outcome::Fail)
        );
    }
    match report.outcome() {
        Outcome::Fail => Err(Unavailable(format!(
            "{} of {} checks failed",
            report.count(Outcome::Fail),
            report.steps.len()
        ))
        .into()),
        Outcome::Pass | Outcome::Warn => Ok(()),
    }
}

fn print_step(step: &Step) {
    println!(
        "{}  {:<15} {}  {:.1} ms  {}",
        step.outcome.label(),
        step.check,
        step.subject,
        step.millis,
        step.detail
    );
    for warning in &step.warnings {
        println!("      warning: {warning}");
    }
}

fn print_json(config: &str, report: &Report) {
    let value = json!({
        "config": config,
        "outcome": report.outcome(),
        "passed": report.count(Outcome::Pass),
        "warnings": report.count(Outcome::Warn),
        "failed": report.count(Outcome::Fail),
        "steps": report.steps,
    });
    println!("{value:#}");
}
