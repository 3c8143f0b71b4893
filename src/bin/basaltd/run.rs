pub async fn run(_cfg: basalt::config::Config, _path: Option<std::path::PathBuf>, _log: crate::LogReload) -> anyhow::Result<()> { anyhow::bail!("not yet") }
