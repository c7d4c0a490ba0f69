//! Where the balancer's files live by default: one small leaf, so the service's configuration
//! and the admin CLI (which reads a local balancer's admin token) agree on the same directory
//! without depending on each other.

use std::path::PathBuf;

/// The data directory a laptop user expects: `$XDG_DATA_HOME/allot/balancer`, else
/// `~/.local/share/allot/balancer`, else `./allot-data`.
pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    match base {
        Some(base) => base.join("allot").join("balancer"),
        None => PathBuf::from("allot-data"),
    }
}
