//! `basalt`: the operator CLI. Thin for now: it inspects data directories
//! offline; the admin API arrives with the cluster.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "basalt", version, about = "Basalt operator CLI")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the volumes recorded in a (stopped) node's data directory.
    Volumes {
        #[arg(long, default_value = "./basalt-demo")]
        data: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Volumes { data } => {
            let path = data.join("volumes.json");
            let text =
                std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let cat: serde_json::Value = serde_json::from_str(&text)?;
            println!("{:<24} {:>16} {:>8}", "NAME", "SIZE", "REPLICAS");
            if let Some(vols) = cat.get("volumes").and_then(|v| v.as_object()) {
                for (name, v) in vols {
                    println!("{:<24} {:>16} {:>8}", name, v["size"], v["replicas"]);
                }
            }
            Ok(())
        }
    }
}
