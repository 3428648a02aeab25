//! Builds the eBPF object from port-guard-ebpf (nightly, build-std) and leaves it in OUT_DIR,
//! where src/guard/load.rs embeds it. No prebuilt object is committed.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let find = |name: &str| {
        metadata
            .packages
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| anyhow!("package {name} not found in the workspace"))
    };
    let ebpf = find("port-guard-ebpf")?;
    let common = find("port-guard-common")?;
    let dir = |p: &cargo_metadata::Package| {
        p.manifest_path
            .parent()
            .expect("a manifest has a parent directory")
            .to_string()
    };
    // The object depends on the shared map layouts too.
    println!("cargo:rerun-if-changed={}", dir(common));
    let ebpf_dir = dir(ebpf);
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
