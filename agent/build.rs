//! Rebuilds the agent when a migration is added or changed: `sqlx::migrate!` embeds the
//! migration folder at compile time, and cargo does not otherwise watch it, so a new
//! migration would be left out of an incremental build (as sqlx's documentation warns).
fn main() {
    println!("cargo:rerun-if-changed=../migrations/agent-sqlite");
}
