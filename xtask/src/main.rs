//! `cargo xtask`: project automation entry points.

fn main() -> anyhow::Result<()> {
    Ok(())
}
