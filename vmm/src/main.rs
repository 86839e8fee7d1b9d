//! The `rangevm` command.

use std::process::ExitCode;

use clap::Parser;
use rangevm::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level.into())
        .format_timestamp_millis()
        .init();
    match rangevm::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            // Print the cause chain once: each error's message names only itself.
            let mut msg = format!("rangevm: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                msg.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
