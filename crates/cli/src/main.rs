//! The `forkvm` binary: parses the command line and hands each verb to the library that owns it.

fn main() -> anyhow::Result<()> {
    Ok(())
}
