//! `torch.save` files read as data: the zip archive of PyTorch 1.6 and later (`data.pkl` and one
//! entry a storage) and the older single stream (five pickles, then the storages one after the
//! other, each after its element count).
//!
//! Every size is checked against what the file really holds before anything is allocated: the
//! pickle through [`crate::pickle`]'s caps, each tensor's extent (offset, shape and strides)
//! against its storage's element count, each storage against its zip entry or its record in the
//! stream, and an entry is inflated only as far as the tensors need. A file that holds less than
//! its tensors claim is refused; nothing is padded with zeros.

use crate::pickle::{Id, Limits, Object, Pickle, Walk};
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{DType, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The largest `data.pkl` (or legacy pickle stream) read: a state dict's pickle is about 150
/// bytes a tensor, so a few MB for the largest checkpoints.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// The tensors of a `torch.save` file, keyed by their path in the saved object (`a.b.c`).
pub struct TorchFile {
    pub tensors: BTreeMap<String, TensorData>,
    /// Whether the file was a training checkpoint whose `model` entry held the state dict (the
    /// tensors are then that entry's, without the prefix).
    pub nested: bool,
}

/// One tensor as the pickle describes it.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    dtype: DType,
    offset: u64,
    shape: Vec<u64>,
    strides: Vec<u64>,
}

impl TensorRef {
    fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    /// One past the last storage element the tensor reads (0 for an empty tensor).
    fn extent(&self) -> Option<u64> {
        if self.shape.contains(&0) {
            return Some(0);
        }
        let last = self
            .shape
            .iter()
            .zip(&self.strides)
            .try_fold(self.offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?))?;
        last.checked_add(1)
    }
}

/// A storage named by the pickle's persistent ids: its element type and count.
#[derive(Clone, Copy, Debug)]
struct StorageInfo {
    dtype: DType,
    numel: Option<u64>,
}

fn storage_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool(burn::tensor::BoolStore::Native),
        other => bail!("tensor storage type '{other}' is not supported (float, int and bool storages are)"),
    })
}

/// A storage persistent id: `('storage', torch.FloatStorage, key, location, numel[, view])`.
fn storage_of(p: &Pickle, pid: Id) -> Result<(String, StorageInfo, u64)> {
    let Object::Tuple(t) = p.get(pid) else { bail!("a tensor's storage id is not a tuple") };
    if t.len() < 3 || p.str(t[0]) != Some("storage") {
        bail!("a tensor's storage id is not ('storage', type, key, ...)");
    }
    let type_name = match p.get(t[1]) {
        Object::Global { name, .. } => name.as_str(),
        Object::Str(s) => s.as_str(),
        _ => bail!("a tensor's storage type is neither a class nor a name"),
    };
    let dtype = storage_dtype(type_name)?;
    let key = match p.get(t[2]) {
        Object::Str(s) => s.clone(),
        Object::Int(i) => i.to_string(),
        _ => bail!("a tensor's storage key is not a string"),
    };
    let numel = match t.get(4).map(|&i| p.get(i)) {
        Some(Object::Int(n)) if *n >= 0 => Some(*n as u64),
        Some(Object::Int(n)) => bail!("storage '{key}' claims {n} elements"),
        _ => None,
    };
    // Legacy files may name a view of a root storage: (view key, offset, size).
    let view_offset = match t.get(5).map(|&i| p.get(i)) {
        Some(Object::Tuple(v)) if v.len() == 3 => match p.get(v[1]) {
            Object::Int(o) if *o >= 0 => *o as u64,
            _ => bail!("storage '{key}' has a view with a bad offset"),
        },
        _ => 0,
    };
    Ok((key, StorageInfo { dtype, numel }, view_offset))
}

fn non_negative(p: &Pickle, id: Id, what: &str) -> Result<u64> {
    match p.get(id) {
        Object::Int(i) if *i >= 0 => Ok(*i as u64),
        Object::Int(i) => bail!("a tensor's {what} is {i}, negative"),
        o => bail!("a tensor's {what} is {}, not an integer", crate::pickle::kind(o)),
    }
}

fn int_tuple(p: &Pickle, id: Id, what: &str) -> Result<Vec<u64>> {
    match p.get(id) {
        Object::Tuple(v) | Object::List(v) if v.len() <= 16 => v.iter().map(|&i| non_negative(p, i, what)).collect(),
        Object::Tuple(v) | Object::List(v) => bail!("a tensor's {what} has {} dimensions", v.len()),
        o => bail!("a tensor's {what} is {}, not a tuple", crate::pickle::kind(o)),
    }
}

/// C-order strides of `shape`.
fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    s
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, ...)` (and the legacy
/// `_rebuild_tensor`, whose arguments begin the same) as a [`TensorRef`]; notes its storage.
fn rebuild_tensor(p: &Pickle, args: &[Id], storages: &mut HashMap<String, StorageInfo>) -> Result<TensorRef> {
    if args.len() < 3 {
        bail!("a tensor is rebuilt from {} arguments, expected at least 3", args.len());
    }
    let Object::Persistent(pid) = p.get(args[0]) else { bail!("a tensor's storage is not a persistent id") };
    let (key, info, view_offset) = storage_of(p, *pid)?;
    let offset = non_negative(p, args[1], "storage offset")?
        .checked_add(view_offset)
        .ok_or_else(|| anyhow!("a tensor's storage offset overflows"))?;
    let shape = int_tuple(p, args[2], "shape")?;
    let strides = match args.get(3) {
        Some(&s) => int_tuple(p, s, "stride")?,
        None => contiguous_strides(&shape),
    };
    if strides.len() != shape.len() {
        bail!("a tensor of {} dimensions has {} strides", shape.len(), strides.len());
    }
    let known = storages.entry(key.clone()).or_insert(info);
    if known.dtype != info.dtype {
        bail!("storage '{key}' is named with two element types");
    }
    known.numel = known.numel.or(info.numel);
    Ok(TensorRef { storage: key, dtype: info.dtype, offset, shape, strides })
}

/// The tensor a `torch` rebuild call describes, if `id` is one.
fn tensor_of(p: &Pickle, id: Id, storages: &mut HashMap<String, StorageInfo>) -> Result<Option<TensorRef>> {
    let Object::Call { callable, args, .. } = p.get(id) else { return Ok(None) };
    let Some((module, name)) = p.global(*callable) else { return Ok(None) };
    let Object::Tuple(args) = p.get(*args) else { return Ok(None) };
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => rebuild_tensor(p, args, storages).map(Some),
        // A parameter: its tensor is the first argument.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args.first() {
            Some(&t) => tensor_of(p, t, storages),
            None => bail!("a parameter without its tensor"),
        },
        // A tensor subclass: `_rebuild_from_type_v2(func, type, args, state)` is func(*args).
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let (Some(&func), Some(&inner)) = (args.first(), args.get(2)) else {
                bail!("_rebuild_from_type_v2 without its function and arguments")
            };
            match (p.global(func), p.get(inner)) {
                (Some(("torch._utils", "_rebuild_tensor_v2")), Object::Tuple(inner)) => {
                    rebuild_tensor(p, inner, storages).map(Some)
                }
                (Some((m, n)), _) => bail!("a tensor rebuilt by {m}.{n} is not supported"),
                _ => bail!("_rebuild_from_type_v2 without its function"),
            }
        }
        _ => Ok(None),
    }
}

/// Every tensor under `id`, with its dotted path: dicts (and OrderedDicts) are walked, tensors
/// collected, anything else left alone.
fn collect(
    p: &Pickle,
    id: Id,
    prefix: &str,
    walk: &mut Walk,
    depth: usize,
    storages: &mut HashMap<String, StorageInfo>,
    out: &mut Vec<(String, TensorRef)>,
) -> Result<()> {
    walk.visit(depth)?;
    if let Some(t) = tensor_of(p, id, storages)? {
        out.push((prefix.to_string(), t));
        return Ok(());
    }
    let Some(items) = p.items(id) else { return Ok(()) };
    for &(k, v) in items {
        let key = match p.get(k) {
            Object::Str(s) => s.clone(),
            Object::Int(i) => i.to_string(),
            _ => continue,
        };
        let path = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
        collect(p, v, &path, walk, depth + 1, storages, out)?;
    }
    Ok(())
}

/// The state dict of a parsed `data.pkl`: the `model` entry of a training checkpoint, or the
/// whole object. Returns the tensors, whether they were nested, and every storage the pickle
/// names (whether or not a collected tensor uses it: a legacy stream must skip them all).
#[allow(clippy::type_complexity)]
fn state_dict_of(p: &Pickle) -> Result<(Vec<(String, TensorRef)>, bool, HashMap<String, StorageInfo>)> {
    let model = p.items(p.root).and_then(|items| {
        items.iter().find(|&&(k, v)| p.str(k) == Some("model") && p.items(v).is_some()).map(|&(_, v)| v)
    });
    let mut storages = HashMap::new();
    // Every storage named anywhere (optimiser state included), for the legacy stream's layout.
    for o in &p.objects {
        if let Object::Persistent(pid) = o {
            if let Ok((key, info, _)) = storage_of(p, *pid) {
                let known = storages.entry(key).or_insert(info);
                known.numel = known.numel.or(info.numel);
            }
        }
    }
    let mut out = vec![];
    // A tree visits each object about once; more visits than objects is a graph that fans out.
    let mut walk = Walk::new(64, 4 * p.objects.len() + 1024);
    collect(p, model.unwrap_or(p.root), "", &mut walk, 0, &mut storages, &mut out)?;
    Ok((out, model.is_some(), storages))
}

/// The bytes each storage must hold for the tensors that read it, checked against the file:
/// no tensor larger than the file, all of them together not more than twice it (tied weights
/// share a storage), each within its storage's element count.
fn storage_needs(
    tensors: &[(String, TensorRef)],
    storages: &HashMap<String, StorageInfo>,
    file_size: u64,
) -> Result<HashMap<String, u64>> {
    let mut claimed_total: u64 = 0;
    let mut needs: HashMap<String, u64> = HashMap::new();
    for (key, t) in tensors {
        let el = t.dtype.size() as u64;
        let claimed = t.numel().and_then(|n| n.checked_mul(el)).unwrap_or(u64::MAX);
        if claimed > file_size {
            bail!(
                "tensor '{}' claims shape {:?} of {:?} ({claimed} bytes), more than the whole file ({file_size} bytes); \
                 the file is corrupt or crafted",
                crate::files::printable(key),
                t.shape,
                t.dtype
            );
        }
        claimed_total = claimed_total.saturating_add(claimed);
        let extent =
            t.extent().ok_or_else(|| anyhow!("tensor '{}': its strides overflow", crate::files::printable(key)))?;
        if let Some(numel) = storages.get(&t.storage).and_then(|s| s.numel) {
            if extent > numel {
                bail!(
                    "tensor '{}' reads elements up to {extent} of storage '{}', which holds {numel}; the file is corrupt or crafted",
                    crate::files::printable(key),
                    t.storage
                );
            }
        }
        let bytes = extent.checked_mul(el).filter(|&b| b <= file_size).ok_or_else(|| {
            anyhow!(
                "tensor '{}' reads storage '{}' up to element {extent}, beyond anything the file ({file_size} bytes) can hold; \
                 the file is corrupt or crafted",
                crate::files::printable(key),
                t.storage
            )
        })?;
        let need = needs.entry(t.storage.clone()).or_insert(0);
        *need = (*need).max(bytes);
    }
    if claimed_total > 2 * file_size + (1 << 20) {
        bail!("its tensors claim {claimed_total} bytes in all, far more than the file's {file_size} bytes; the file is corrupt or crafted");
    }
    Ok(needs)
}

/// A tensor's values from its storage's bytes, in C order (a strided view gathered).
fn tensor_data(t: &TensorRef, storage: &[u8]) -> TensorData {
    let el = t.dtype.size();
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let numel: usize = shape.iter().product();
    let offset = t.offset as usize;
    let bytes = if numel == 0 {
        vec![]
    } else if t.strides == contiguous_strides(&t.shape) || numel == 1 {
        storage[offset * el..(offset + numel) * el].to_vec()
    } else {
        let mut out = Vec::with_capacity(numel * el);
        let mut index = vec![0usize; shape.len()];
        for _ in 0..numel {
            let at = offset + index.iter().zip(&t.strides).map(|(&i, &s)| i * s as usize).sum::<usize>();
            out.extend_from_slice(&storage[at * el..(at + 1) * el]);
            for d in (0..shape.len()).rev() {
                index[d] += 1;
                if index[d] < shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    };
    TensorData::from_bytes_vec(bytes, shape, t.dtype)
}

fn assemble(tensors: Vec<(String, TensorRef)>, data: &HashMap<String, Vec<u8>>, nested: bool) -> TorchFile {
    let tensors = tensors.into_iter().map(|(k, t)| {
        let d = tensor_data(&t, &data[&t.storage]);
        (k, d)
    });
    TorchFile { tensors: tensors.collect(), nested }
}

/// Read a `torch.save` file of `file_size` bytes (zip or legacy).
pub fn read(path: &Path, file_size: u64, zip: bool) -> Result<TorchFile> {
    if zip {
        read_zip(path, file_size)
    } else {
        read_legacy(path, file_size)
    }
}

fn read_zip(path: &Path, file_size: u64) -> Result<TorchFile> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| anyhow!("not a readable zip archive ({e})"))?;
    let pkl = archive
        .file_names()
        .find(|n| {
            n.strip_suffix("data.pkl")
                .is_some_and(|dir| dir.is_empty() || (dir.ends_with('/') && dir.matches('/').count() == 1))
        })
        .map(String::from)
        .ok_or_else(|| anyhow!("the archive has no data.pkl: not a torch.save file"))?;
    let dir = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let entry_bytes = |archive: &mut zip::ZipArchive<_>, name: &str, max: u64| -> Result<Vec<u8>> {
        let entry = archive.by_name(name).map_err(|e| anyhow!("cannot read entry {name}: {e}"))?;
        let mut out = vec![];
        entry.take(max + 1).read_to_end(&mut out).map_err(|e| anyhow!("cannot read entry {name}: {e}"))?;
        if out.len() as u64 > max {
            bail!("entry {name} inflates past {max} bytes");
        }
        Ok(out)
    };
    if archive.file_names().any(|n| n == format!("{dir}byteorder")) {
        let order = entry_bytes(&mut archive, &format!("{dir}byteorder"), 16)?;
        if order != b"little" {
            bail!(
                "the file was saved on a {} machine; only little-endian files are read",
                String::from_utf8_lossy(&order)
            );
        }
    }
    let bytes = entry_bytes(&mut archive, &pkl, MAX_PICKLE_BYTES).context("data.pkl")?;
    let p = Pickle::parse(&bytes, Limits::default()).context("data.pkl")?;
    drop(bytes);
    let (tensors, nested, storages) = state_dict_of(&p)?;
    drop(p);
    let needs = storage_needs(&tensors, &storages, file_size)?;
    let mut data = HashMap::new();
    for (key, need) in needs {
        let name = format!("{dir}data/{key}");
        let entry = archive
            .by_name(&name)
            .map_err(|_| anyhow!("storage '{key}' is missing: the archive has no entry {name}"))?;
        let declared = entry.size();
        let mut buf = Vec::with_capacity(need.min(declared) as usize);
        entry.take(need).read_to_end(&mut buf).map_err(|e| anyhow!("cannot read storage '{key}': {e}"))?;
        if (buf.len() as u64) < need {
            bail!(
                "storage '{key}' holds {} bytes but its tensors need {need}; the file is truncated or crafted",
                buf.len()
            );
        }
        data.insert(key, buf);
    }
    Ok(assemble(tensors, &data, nested))
}

/// PyTorch's magic number at the head of a legacy file: 0x1950a86a20f9469cfc6c, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn read_legacy(path: &Path, file_size: u64) -> Result<TorchFile> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = vec![];
    (&mut file).take(MAX_PICKLE_BYTES.min(file_size)).read_to_end(&mut head)?;
    let mut at = 0usize;
    let mut next = |what: &str| -> Result<Pickle> {
        let p = Pickle::parse(&head[at..], Limits::default()).with_context(|| {
            if head.len() as u64 == MAX_PICKLE_BYTES {
                format!(
                    "the {what} pickle (the pickles of a legacy file must fit in its first {MAX_PICKLE_BYTES} bytes)"
                )
            } else {
                format!("the {what} pickle")
            }
        })?;
        at += p.len;
        Ok(p)
    };
    let magic = next("magic-number")?;
    if !matches!(magic.get(magic.root), Object::BigInt(b) if b[..] == LEGACY_MAGIC) {
        bail!("it is a pickle, but not a torch.save file (no PyTorch magic number)");
    }
    let version = next("protocol-version")?;
    if !matches!(version.get(version.root), Object::Int(1001)) {
        bail!("legacy torch.save protocol {:?} is not supported (1001 is)", version.get(version.root));
    }
    let sys = next("sys-info")?;
    let little = sys
        .items(sys.root)
        .and_then(|items| items.iter().find(|&&(k, _)| sys.str(k) == Some("little_endian")).map(|&(_, v)| v));
    if let Some(v) = little {
        if sys.get(v) != &Object::Bool(true) {
            bail!("the file was saved on a big-endian machine; only little-endian files are read");
        }
    }
    let main = next("main")?;
    let keys = next("storage-key")?;
    let Object::List(key_ids) = keys.get(keys.root) else { bail!("the storage keys are not a list") };
    let order: Vec<String> = key_ids
        .iter()
        .map(|&k| keys.str(k).map(String::from).ok_or_else(|| anyhow!("a storage key is not a string")))
        .collect::<Result<_>>()?;
    let (tensors, nested, storages) = state_dict_of(&main)?;
    drop(main);
    let needs = storage_needs(&tensors, &storages, file_size)?;
    // The storages follow, in key order: an 8-byte element count, then the elements.
    let mut pos = at as u64;
    let mut data = HashMap::new();
    for key in order {
        let info =
            storages.get(&key).ok_or_else(|| anyhow!("storage '{key}' is listed but no tensor names its type"))?;
        file.seek(SeekFrom::Start(pos))?;
        let mut count = [0u8; 8];
        file.read_exact(&mut count).map_err(|_| anyhow!("the file ends before storage '{key}'"))?;
        pos += 8;
        let numel = u64::from_le_bytes(count);
        let left = file_size.saturating_sub(pos);
        let bytes = numel.checked_mul(info.dtype.size() as u64).filter(|&b| b <= left).ok_or_else(|| {
            anyhow!("storage '{key}' claims {numel} elements of {:?}, more than the {left} bytes left in the file; the file is corrupt or crafted", info.dtype)
        })?;
        if let Some(declared) = info.numel.filter(|&d| d != numel) {
            bail!("storage '{key}' holds {numel} elements, but the pickle says {declared}; the file is corrupt or crafted");
        }
        if let Some(&need) = needs.get(&key) {
            if need > bytes {
                bail!(
                    "storage '{key}' holds {bytes} bytes but its tensors need {need}; the file is corrupt or crafted"
                );
            }
            let mut buf = vec![0u8; need as usize];
            file.read_exact(&mut buf).map_err(|e| anyhow!("cannot read storage '{key}': {e}"))?;
            data.insert(key, buf);
        }
        pos += bytes;
    }
    if let Some(key) = needs.keys().find(|k| !data.contains_key(*k)) {
        bail!("storage '{key}' is used by a tensor but missing from the file");
    }
    Ok(assemble(tensors, &data, nested))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// One tensor of a crafted state dict: name, storage key, storage type, the storage's element
    /// count as the pickle states it, offset, shape, strides.
    pub struct Spec<'a> {
        pub name: &'a str,
        pub storage: &'a str,
        pub kind: &'a str,
        pub numel: i64,
        pub offset: i64,
        pub shape: &'a [i64],
        pub strides: &'a [i64],
    }

    fn text(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }

    fn int(p: &mut Vec<u8>, v: i64) {
        p.push(0x8a);
        p.push(8);
        p.extend(v.to_le_bytes());
    }

    fn ints(p: &mut Vec<u8>, v: &[i64]) {
        p.push(b'(');
        for &x in v {
            int(p, x);
        }
        p.push(b't');
    }

    /// An OrderedDict of tensors as `torch.save` pickles it (protocol 2), optionally under a
    /// checkpoint's `model` key beside an optimiser entry.
    pub fn state_dict_pickle(specs: &[Spec], nested: bool) -> Vec<u8> {
        let mut p = b"\x80\x02".to_vec();
        if nested {
            p.extend(b"}(");
            text(&mut p, "model");
        }
        p.extend(b"ccollections\nOrderedDict\n)R(");
        for s in specs {
            text(&mut p, s.name);
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
            text(&mut p, "storage");
            p.extend(format!("ctorch\n{}\n", s.kind).as_bytes());
            text(&mut p, s.storage);
            text(&mut p, "cpu");
            int(&mut p, s.numel);
            p.extend(b"tQ");
            int(&mut p, s.offset);
            ints(&mut p, s.shape);
            ints(&mut p, s.strides);
            p.extend(b"\x89ccollections\nOrderedDict\n)RtR");
        }
        p.push(b'u');
        if nested {
            text(&mut p, "optimizer");
            p.extend(b"}u");
        }
        p.push(b'.');
        p
    }

    /// A zip `.pth` with `pkl` as `archive/data.pkl` and the given storages, deflated or stored.
    pub fn zip_pth(path: &Path, pkl: &[u8], storages: &[(&str, Vec<u8>)], deflate: bool) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
        let opts = zip::write::SimpleFileOptions::default().compression_method(method).large_file(true);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pkl).unwrap();
        z.start_file("archive/byteorder", opts).unwrap();
        z.write_all(b"little").unwrap();
        for (key, bytes) in storages {
            z.start_file(format!("archive/data/{key}"), opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }

    fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
        v.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    fn read_path(path: &Path) -> Result<TorchFile> {
        let size = std::fs::metadata(path).unwrap().len();
        let zip = std::fs::read(path).unwrap().starts_with(b"PK");
        read(path, size, zip)
    }

    /// Contiguous tensors, a transposed view and a tied alias of one storage read back exactly,
    /// from a stored and from a deflated archive, nested or not.
    #[test]
    fn zip_tensors_views_and_shared_storages_read_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [
            Spec {
                name: "w",
                storage: "0",
                kind: "FloatStorage",
                numel: 6,
                offset: 0,
                shape: &[2, 3],
                strides: &[3, 1],
            },
            Spec {
                name: "wt",
                storage: "0",
                kind: "FloatStorage",
                numel: 6,
                offset: 0,
                shape: &[3, 2],
                strides: &[1, 3],
            },
            Spec { name: "tail", storage: "0", kind: "FloatStorage", numel: 6, offset: 4, shape: &[2], strides: &[1] },
            Spec { name: "n", storage: "1", kind: "LongStorage", numel: 1, offset: 0, shape: &[], strides: &[] },
        ];
        let storages = [("0", f32_bytes((0..6).map(|i| i as f32))), ("1", 7i64.to_le_bytes().to_vec())];
        for (nested, deflate) in [(false, false), (true, true)] {
            let path = dir.path().join(format!("t{nested}{deflate}.pth"));
            zip_pth(&path, &state_dict_pickle(&specs, nested), &storages, deflate);
            let f = read_path(&path).unwrap();
            assert_eq!(f.nested, nested);
            assert_eq!(f.tensors["w"].to_vec::<f32>().unwrap(), [0., 1., 2., 3., 4., 5.]);
            assert_eq!(f.tensors["wt"].to_vec::<f32>().unwrap(), [0., 3., 1., 4., 2., 5.]);
            assert_eq!(f.tensors["wt"].shape.to_vec(), [3, 2]);
            assert_eq!(f.tensors["tail"].to_vec::<f32>().unwrap(), [4., 5.]);
            assert_eq!(f.tensors["n"].to_vec::<i64>().unwrap(), [7]);
        }
    }

    /// What a file holds less of than it claims is refused, never padded: a storage entry shorter
    /// than the tensor, a tensor beyond its storage's element count, a missing entry, strides
    /// reaching past the file, negative sizes.
    #[test]
    fn short_or_lying_storages_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = |numel: i64, offset: i64, shape: &'static [i64], strides: &'static [i64]| {
            [Spec { name: "w", storage: "0", kind: "FloatStorage", numel, offset, shape, strides }]
        };
        type Case<'a> = ([Spec<'a>; 1], Vec<(&'a str, Vec<u8>)>, &'a str);
        let cases: Vec<Case> = vec![
            (one(50, 0, &[50], &[1]), vec![("0", f32_bytes([1.0, 2.0]))], "holds 8 bytes but its tensors need 200"),
            (
                one(2, 0, &[50], &[1]),
                vec![("0", f32_bytes([0.0; 50]))],
                "reads elements up to 50 of storage '0', which holds 2",
            ),
            (one(50, 0, &[50], &[1]), vec![], "no entry archive/data/0"),
            (one(1 << 50, 0, &[2], &[1 << 40]), vec![("0", f32_bytes([0.0; 50]))], "beyond anything the file"),
            (one(50, -1, &[2], &[1]), vec![("0", f32_bytes([0.0; 50]))], "storage offset is -1, negative"),
            (one(50, 0, &[-2], &[1]), vec![("0", f32_bytes([0.0; 50]))], "shape is -2, negative"),
            (
                one(1 << 40, 0, &[1 << 30, 1 << 30], &[1 << 30, 1]),
                vec![("0", f32_bytes([0.0; 50]))],
                "more than the whole file",
            ),
        ];
        for (i, (specs, storages, want)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("c{i}.pth"));
            zip_pth(&path, &state_dict_pickle(&specs, false), &storages, false);
            let e = format!("{:#}", read_path(&path).err().unwrap_or_else(|| panic!("case {i} was accepted")));
            assert!(e.contains(want), "case {i}: {e}");
        }
    }

    /// Bombs: a storage entry that inflates to 64 MiB for a 16-byte tensor is read 16 bytes
    /// deep; a data.pkl that inflates past the pickle limit is refused; a dict-shaped memo bomb
    /// and a deeply nested dict end at the walk's bounds.
    #[test]
    fn inflation_and_memo_bombs_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let specs =
            [Spec { name: "w", storage: "0", kind: "FloatStorage", numel: 4, offset: 0, shape: &[4], strides: &[1] }];
        let path = dir.path().join("inflate.pth");
        let mut big = f32_bytes([1.0, 2.0, 3.0, 4.0]);
        big.resize(64 << 20, 0);
        zip_pth(&path, &state_dict_pickle(&specs, false), &[("0", big)], true);
        assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20);
        assert_eq!(read_path(&path).unwrap().tensors["w"].to_vec::<f32>().unwrap(), [1., 2., 3., 4.]);

        let mut pkl = b"\x80\x02N".to_vec();
        pkl.resize(MAX_PICKLE_BYTES as usize + 10, b'0');
        let path = dir.path().join("pkl_bomb.pth");
        zip_pth(&path, &pkl, &[], true);
        let e = format!("{:#}", read_path(&path).err().unwrap());
        assert!(e.contains("inflates past"), "{e}");

        let bomb = crate::pickle::crafted::dict_memo_bomb();
        let path = dir.path().join("memo_bomb.pth");
        zip_pth(&path, &bomb, &[], false);
        let e = format!("{:#}", read_path(&path).err().unwrap());
        assert!(e.contains("memo bomb"), "{e}");

        let deep = crate::pickle::crafted::nested_dicts(200_000);
        let path = dir.path().join("deep.pth");
        zip_pth(&path, &deep, &[], false);
        let e = format!("{:#}", read_path(&path).err().unwrap());
        assert!(e.contains("nests deeper than 64"), "{e}");
    }

    /// A legacy (pre-1.6) stream: magic, version, sys info, the state dict, the storage keys,
    /// then each storage after its element count.
    fn legacy_pth(specs: &[Spec], keys: &[&str], records: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut f = b"\x80\x02\x8a\x0a".to_vec();
        f.extend(LEGACY_MAGIC);
        f.extend(b".\x80\x02M\xe9\x03.\x80\x02}(");
        text(&mut f, "little_endian");
        f.extend(b"\x88u.");
        f.extend(state_dict_pickle(specs, false));
        f.extend(b"\x80\x02(");
        for k in keys {
            text(&mut f, k);
        }
        f.extend(b"l.");
        for (count, bytes) in records {
            f.extend(count.to_le_bytes());
            f.extend(bytes);
        }
        f
    }

    #[test]
    fn legacy_streams_read_and_lying_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [
            Spec { name: "a", storage: "k1", kind: "FloatStorage", numel: 3, offset: 0, shape: &[3], strides: &[1] },
            Spec { name: "b", storage: "k2", kind: "DoubleStorage", numel: 2, offset: 1, shape: &[1], strides: &[1] },
        ];
        let good = [(3, f32_bytes([1.0, 2.0, 3.0])), (2, [5f64, 6f64].iter().flat_map(|v| v.to_le_bytes()).collect())];
        let path = dir.path().join("legacy.pth");
        std::fs::write(&path, legacy_pth(&specs, &["k1", "k2"], &good)).unwrap();
        let f = read_path(&path).unwrap();
        assert_eq!(f.tensors["a"].to_vec::<f32>().unwrap(), [1., 2., 3.]);
        assert_eq!(f.tensors["b"].to_vec::<f64>().unwrap(), [6.]);
        for (count, want) in [
            (1u64 << 50, "claims 1125899906842624 elements"),
            (u64::MAX, "claims 18446744073709551615 elements"),
            (1 << 61, "more than the"),
            (2, "holds 2 elements, but the pickle says 3"),
        ] {
            let mut records = good.to_vec();
            records[0].0 = count;
            std::fs::write(&path, legacy_pth(&specs, &["k1", "k2"], &records)).unwrap();
            let e = format!("{:#}", read_path(&path).err().unwrap());
            assert!(e.contains(want), "count {count}: {e}");
        }
        let mut cut = legacy_pth(&specs, &["k1", "k2"], &good);
        cut.truncate(cut.len() - 12);
        std::fs::write(&path, cut).unwrap();
        let e = format!("{:#}", read_path(&path).err().unwrap());
        assert!(e.contains("storage 'k2'"), "{e}");
    }
}
