//! Rebuilds the balancer when a migration is added or changed: `sqlx::migrate!` embeds the
//! migration folders at compile time, and cargo does not otherwise watch them, so a new
//! migration would be left out of an incremental build (as sqlx's documentation warns).
fn main() {
    println!("cargo:rerun-if-changed=../migrations/balancer-postgres");
    println!("cargo:rerun-if-changed=../migrations/balancer-sqlite");
}
