//! `client completions SHELL`: the shell's completion script on stdout, generated from the
//! same clap definition the binary parses with, so it never falls behind a new flag.
//!
//!   client completions bash > ~/.local/share/bash-completion/completions/client

use clap::CommandFactory;

use crate::error::Result;
use crate::{Cli, Ctx, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

pub fn run(ctx: &mut Ctx<'_>, args: Args) -> Result<Outcome> {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "client", &mut *ctx.out);
    Ok(Outcome::Success)
}
