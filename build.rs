//! Records the git commit the binary is built from (for `confab --version`,
//! `confab_build_info` and `/api/v1/status`): `CONFAB_GIT_HASH` when set
//! (a container build has no .git), else `git rev-parse`, else "unknown".

fn main() {
    println!("cargo:rerun-if-env-changed=CONFAB_GIT_HASH");
    if let Ok(hash) = std::env::var("CONFAB_GIT_HASH")
        && !hash.trim().is_empty()
    {
        println!("cargo:rustc-env=CONFAB_GIT_HASH={}", hash.trim());
        return;
    }
    let hash = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CONFAB_GIT_HASH={hash}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
