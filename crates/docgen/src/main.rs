//! `devid-docgen OUT_DIR`: writes the man pages (`OUT_DIR/CMD/man/*.1`, one per command and
//! subcommand, e.g. `devid-secret-put.1`) and the bash, zsh and fish completions
//! (`OUT_DIR/CMD/completions/{bash,zsh,fish}/`) of `devid` and `devid-server`, generated from
//! their clap definitions, so that they never drift from `--help`. `scripts/package` runs it
//! and the Debian packages install what it writes.
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: devid-docgen OUT_DIR");
    };
    let out = PathBuf::from(out);
    for cmd in [
        devid::cli::Cli::command(),
        devid_server::cli::Cli::command(),
    ] {
        generate(cmd, &out)?;
    }
    Ok(())
}

fn generate(cmd: clap::Command, out: &Path) -> Result<()> {
    let name = cmd.get_name().to_owned();
    let out = out.join(&name);
    let man = out.join("man");
    fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    // One page for the command and one for each (nested) subcommand: devid-secret-put.1.
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("writing the man pages of {name} into {}", man.display()))?;
    for (shell, dir) in [
        (Shell::Bash, "bash"),
        (Shell::Zsh, "zsh"),
        (Shell::Fish, "fish"),
    ] {
        let dir = out.join("completions").join(dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = cmd.clone();
        clap_complete::generate_to(shell, &mut cmd, &name, &dir)
            .with_context(|| format!("writing the {shell} completion of {name}"))?;
    }
    Ok(())
}
