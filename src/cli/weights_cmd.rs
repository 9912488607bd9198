use anyhow::{bail, Context, Result};
use mvlt::device::Cpu;
use mvlt::model::weights::{
    is_buffer_or_alias, reference_layout, resolve_config, write_safetensors, StateDict, CONFIG_METADATA_KEY,
    TIED_DECODER_KEY,
};
use mvlt::model::{Pvlt, PvltConfig};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Weights file (safetensors or .pth). Omit to describe the layout of `--config` instead.
    weights: Option<PathBuf>,
    /// Architecture (preset or config file); default: stored in / inferred from the weights.
    #[arg(long)]
    config: Option<String>,
    /// Print every key with its shape and dtype.
    #[arg(long)]
    keys: bool,
    /// Compare key names and shapes with a reference manifest_*.json (exit 1 on any difference).
    #[arg(long)]
    manifest: Option<PathBuf>,
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn describe(cfg: &PvltConfig) -> String {
    format!(
        "{} (depths {:?}, embed_dims {:?}, num_heads {:?}, token_hidden_size {}, T {}, pos-embed size {}); heads: {}",
        cfg.variant_name().map(|v| format!("pvlt_{v}")).unwrap_or_else(|| "custom".into()),
        cfg.depths,
        cfg.embed_dims,
        cfg.num_heads,
        cfg.token_hidden_size,
        cfg.num_text_tokens,
        cfg.img_size,
        cfg.heads.names().join(", ")
    )
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let sd = a.weights.as_ref().map(|w| StateDict::read(w)).transpose()?;
    let cfg = resolve_config(a.config.as_deref(), sd.as_ref())?;
    // The layout: from the file when given, else from a freshly built model.
    let layout: Vec<(String, Vec<usize>, String)> = match &sd {
        Some(sd) => {
            println!("file:          {} ({})", sd.path.display(), sd.format);
            sd.tensors
                .iter()
                .map(|(k, d)| (k.clone(), d.shape.to_vec(), format!("{:?}", d.dtype).to_lowercase()))
                .collect()
        }
        None => {
            let model = Pvlt::<Cpu>::new(&cfg, &Default::default());
            reference_layout(&model, &cfg).into_iter().map(|(k, s, d)| (k, s, d.to_string())).collect()
        }
    };
    let params: usize =
        layout.iter().filter(|(k, _, _)| !is_buffer_or_alias(k)).map(|(_, s, _)| s.iter().product::<usize>()).sum();
    println!("architecture:  {}", describe(&cfg));
    println!(
        "tensors:       {} keys{}",
        layout.len(),
        if layout.iter().any(|(k, _, _)| k == TIED_DECODER_KEY) { " (incl. the tied decoder alias)" } else { "" }
    );
    println!("parameters:    {} (unique; the tied word embeddings / MLM decoder counted once)", thousands(params));
    if a.keys {
        for (k, s, d) in &layout {
            println!("  {:<55} {:<22} {d}", mvlt::files::printable(k), format!("{s:?}"));
        }
    }
    if let Some(m) = &a.manifest {
        let text = mvlt::files::read_text_limited(m, "manifest", mvlt::files::MAX_SMALL_FILE_BYTES)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("manifest {} is not JSON", m.display()))?;
        let diffs = manifest_differences(&layout, &v)?;
        if diffs.is_empty() {
            println!("manifest:      {} — all keys and shapes match", m.display());
        } else {
            for d in &diffs {
                println!("  {d}");
            }
            bail!("{} difference(s) from manifest {}", diffs.len(), m.display());
        }
    }
    Ok(())
}

/// Differences between a layout and a reference manifest (`keys`: [{key, shape}]). The tied
/// decoder alias, which safetensors files omit, is not counted as missing.
pub fn manifest_differences(
    layout: &[(String, Vec<usize>, String)],
    manifest: &serde_json::Value,
) -> Result<Vec<String>> {
    let keys = manifest.get("keys").and_then(|k| k.as_array()).context("manifest has no `keys` list")?;
    let ours: HashMap<&str, &Vec<usize>> = layout.iter().map(|(k, s, _)| (k.as_str(), s)).collect();
    let mut diffs = vec![];
    let mut theirs = std::collections::HashSet::new();
    for e in keys {
        let k = e["key"].as_str().context("manifest entry without key")?;
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).context("manifest shape")?;
        theirs.insert(k.to_string());
        match ours.get(k) {
            None if k == TIED_DECODER_KEY => {}
            None => diffs.push(format!("missing: {} {shape:?}", mvlt::files::printable(k))),
            Some(s) if **s != shape => {
                diffs.push(format!("shape: {} ours {s:?}, manifest {shape:?}", mvlt::files::printable(k)))
            }
            _ => {}
        }
    }
    for (k, _, _) in layout {
        if !theirs.contains(k) {
            diffs.push(format!("unexpected: {}", mvlt::files::printable(k)));
        }
    }
    Ok(diffs)
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Input: PyTorch .pth (training checkpoint with a 'model' entry, or a bare state dict) or safetensors.
    input: PathBuf,
    /// Output safetensors file (written atomically).
    output: PathBuf,
    /// Architecture to record in the output (default: the preset matching the shapes, if any).
    #[arg(long)]
    config: Option<String>,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let sd = StateDict::read(&a.input)?;
    let cfg = match resolve_config(a.config.as_deref(), Some(&sd)) {
        Ok(c) => Some(c),
        Err(e) if a.config.is_none() => {
            eprintln!("note: {e:#}; writing the tensors without a stored config");
            None
        }
        Err(e) => return Err(e),
    };
    // Check the file really fits the config before recording it.
    if let Some(cfg) = &cfg {
        let model = Pvlt::<Cpu>::new(cfg, &Default::default());
        let (_, report) = mvlt::model::weights::load_state_dict(model, &sd, false)?;
        if !report.missing.is_empty() || !report.unexpected.is_empty() {
            eprintln!("note: against {}: {}", describe(cfg), report.summary());
        }
    }
    let tensors: Vec<_> = sd
        .tensors
        .iter()
        .filter(|(k, _)| k.as_str() != TIED_DECODER_KEY)
        .map(|(k, d)| (k.clone(), d.clone()))
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("mvlt.source".to_string(), a.input.display().to_string());
    if let Some(cfg) = &cfg {
        meta.insert(CONFIG_METADATA_KEY.to_string(), serde_json::to_string(cfg)?);
    }
    write_safetensors(&a.output, &tensors, meta)?;
    println!(
        "wrote {} tensors to {}{}",
        tensors.len(),
        a.output.display(),
        cfg.map(|c| format!(" ({})", describe(&c))).unwrap_or_default()
    );
    Ok(())
}
