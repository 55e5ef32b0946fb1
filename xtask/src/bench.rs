//! `cargo xtask bench lifecycle` (filled in below).
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("bench lifecycle is not built yet")
}
