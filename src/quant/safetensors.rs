//! The safetensors container (Hugging Face's format: an 8-byte little-endian header length, a JSON
//! header naming each tensor's dtype, shape and byte range, then the bytes), read and written without
//! dependencies: the on-disk form of [`PackedW4`](super::PackedW4) (`write_packed` / `read_packed`) and
//! a reader for the fp32/bf16/f16 checkpoints the quantisers take (`SafeTensors`).
//!
//! Reading validates everything before use: the header length against the file, the JSON, every
//! tensor's dtype, shape and byte range (inside the data, sizes matching the shape, no overlap), and
//! any malformed file is an `Err(Invalid)` naming what is wrong, never a panic.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// One tensor of a safetensors file: its dtype name (`"F32"`, `"BF16"`, `"U8"`, ...), shape and bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorView<'a> {
    /// The dtype as the file names it.
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// The little-endian bytes (`product(shape) · size(dtype)`).
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// The values as f32, for F32, BF16 and F16 tensors (`Err(DType)` for others).
    ///
    /// ```
    /// use fusekit::quant::safetensors::{write, SafeTensors};
    /// let bytes = write(&[("w", "F32", vec![2], 1.5f32.to_le_bytes().iter().chain(&2.0f32.to_le_bytes()).copied().collect())], &[])?;
    /// let st = SafeTensors::parse(&bytes)?;
    /// assert_eq!(st.tensor("w")?.to_f32()?, vec![1.5, 2.0]);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = self.data;
        Ok(match self.dtype.as_str() {
            "F32" => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "BF16" => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "F16" => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::DType {
                    arg: "tensor",
                    expected: "F32, BF16 or F16".into(),
                    got: other.into(),
                })
            }
        })
    }
}

/// A parsed safetensors file borrowing its bytes.
#[derive(Clone, Debug)]
pub struct SafeTensors<'a> {
    tensors: BTreeMap<String, TensorView<'a>>,
    metadata: BTreeMap<String, String>,
}

fn bad(what: impl Into<String>) -> Error {
    Error::invalid("safetensors", what.into())
}

/// Bytes per element of a safetensors dtype.
fn dtype_size(d: &str) -> Option<usize> {
    Some(match d {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

impl<'a> SafeTensors<'a> {
    /// Parses and validates `bytes` (see the module documentation).
    ///
    /// ```
    /// use fusekit::quant::safetensors::SafeTensors;
    /// assert!(SafeTensors::parse(b"not a file").is_err());
    /// let mut f = 2u64.to_le_bytes().to_vec();
    /// f.extend_from_slice(b"{}");
    /// assert_eq!(SafeTensors::parse(&f)?.names().count(), 0);
    /// # Ok::<(), fusekit::Error>(())
    /// ```
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < 8 {
            return Err(bad(format!(
                "{} bytes: shorter than the 8-byte header length",
                bytes.len()
            )));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if n > (bytes.len() - 8) as u64 || n > 100 << 20 {
            return Err(bad(format!(
                "header of {n} bytes in a file of {} bytes (limit 100 MiB)",
                bytes.len()
            )));
        }
        let header = std::str::from_utf8(&bytes[8..8 + n as usize])
            .map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
        let data = &bytes[8 + n as usize..];
        let json = Json::parse(header)?;
        let Json::Object(entries) = json else {
            return Err(bad("header is not a JSON object"));
        };
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        let mut ranges = Vec::new();
        for (name, v) in entries {
            if name == "__metadata__" {
                let Json::Object(m) = v else {
                    return Err(bad("__metadata__ is not an object"));
                };
                for (k, v) in m {
                    let Json::Str(s) = v else {
                        return Err(bad(format!("metadata {k:?} is not a string")));
                    };
                    metadata.insert(k, s);
                }
                continue;
            }
            let Json::Object(fields) = v else {
                return Err(bad(format!("tensor {name:?} is not an object")));
            };
            let field = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            let Some(Json::Str(dtype)) = field("dtype") else {
                return Err(bad(format!("tensor {name:?} has no string dtype")));
            };
            let size = dtype_size(dtype)
                .ok_or_else(|| bad(format!("tensor {name:?}: unknown dtype {dtype}")))?;
            let ints = |key: &str| -> Result<Vec<usize>> {
                match field(key) {
                    Some(Json::Array(a)) => a
                        .iter()
                        .map(|x| match x {
                            Json::Int(i) => Ok(*i),
                            _ => Err(bad(format!("tensor {name:?}: {key} holds a non-integer"))),
                        })
                        .collect(),
                    _ => Err(bad(format!("tensor {name:?} has no {key} array"))),
                }
            };
            let shape = ints("shape")?;
            let off = ints("data_offsets")?;
            let elems = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor {name:?}: shape {shape:?} overflows")))?;
            if off.len() != 2 || off[0] > off[1] || off[1] > data.len() {
                return Err(bad(format!(
                    "tensor {name:?}: data_offsets {off:?} outside the {} data bytes",
                    data.len()
                )));
            }
            if elems.checked_mul(size) != Some(off[1] - off[0]) {
                return Err(bad(format!(
                    "tensor {name:?}: {} bytes for shape {shape:?} of {dtype}",
                    off[1] - off[0]
                )));
            }
            ranges.push((off[0], off[1], name.clone()));
            if tensors.contains_key(&name) {
                return Err(bad(format!("tensor {name:?} twice")));
            }
            tensors.insert(
                name,
                TensorView {
                    dtype: dtype.clone(),
                    shape,
                    data: &data[off[0]..off[1]],
                },
            );
        }
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(bad(format!(
                    "tensors {:?} and {:?} overlap",
                    w[0].2, w[1].2
                )));
            }
        }
        Ok(SafeTensors { tensors, metadata })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// The tensor `name` (`Err(Invalid)` if absent).
    pub fn tensor(&self, name: &str) -> Result<&TensorView<'a>> {
        self.tensors
            .get(name)
            .ok_or_else(|| bad(format!("no tensor {name:?}")))
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
}

/// A safetensors file from `(name, dtype, shape, bytes)` tensors (in order, contiguous) and string
/// metadata. `Err` when a tensor's bytes do not match its dtype and shape, or a dtype is unknown.
pub fn write<S: AsRef<str>>(
    tensors: &[(S, &str, Vec<usize>, Vec<u8>)],
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>> {
    let mut h = String::from("{");
    if !metadata.is_empty() {
        h.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&format!("{}:{}", quote(k), quote(v)));
        }
        h.push('}');
    }
    let mut off = 0usize;
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        let name = name.as_ref();
        let size = dtype_size(dtype).ok_or_else(|| bad(format!("unknown dtype {dtype}")))?;
        let want = shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {name:?}: shape {shape:?} overflows")))?;
        if want != bytes.len() {
            return Err(bad(format!(
                "tensor {name:?}: {} bytes for shape {shape:?} of {dtype}",
                bytes.len()
            )));
        }
        if i > 0 || !metadata.is_empty() {
            h.push(',');
        }
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        h.push_str(&format!(
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            quote(name),
            dims.join(","),
            off + bytes.len()
        ));
        off += bytes.len();
    }
    h.push('}');
    // Pad the header with spaces to a multiple of 8 bytes (the data stays aligned).
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    for (_, _, _, b) in tensors {
        out.extend_from_slice(b);
    }
    Ok(out)
}

fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The JSON a safetensors header holds: objects (order kept), arrays, strings, non-negative integers;
/// other numbers, booleans and null parse but are only accepted where the format allows them.
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Object(Vec<(String, Json)>),
    Array(Vec<Json>),
    Str(String),
    Int(usize),
    Other,
}

impl Json {
    fn parse(s: &str) -> Result<Json> {
        let mut p = Parser {
            b: s.as_bytes(),
            i: 0,
            depth: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.b.len() {
            return Err(bad(format!(
                "trailing bytes after the header's JSON at {}",
                p.i
            )));
        }
        Ok(v)
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<()> {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(bad(format!(
                "header JSON: expected '{}' at byte {}",
                c as char, self.i
            )))
        }
    }

    fn value(&mut self) -> Result<Json> {
        self.ws();
        self.depth += 1;
        if self.depth > 64 {
            return Err(bad("header JSON nested deeper than 64"));
        }
        let v = match self.b.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut entries = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                } else {
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.eat(b':')?;
                        let v = self.value()?;
                        entries.push((k, v));
                        self.ws();
                        match self.b.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                break;
                            }
                            _ => {
                                return Err(bad(format!(
                                    "header JSON: expected ',' or '}}' at byte {}",
                                    self.i
                                )))
                            }
                        }
                    }
                }
                Json::Object(entries)
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                } else {
                    loop {
                        items.push(self.value()?);
                        self.ws();
                        match self.b.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                break;
                            }
                            _ => {
                                return Err(bad(format!(
                                    "header JSON: expected ',' or ']' at byte {}",
                                    self.i
                                )))
                            }
                        }
                    }
                }
                Json::Array(items)
            }
            Some(b'"') => Json::Str(self.string()?),
            Some(b'0'..=b'9') => {
                let start = self.i;
                while self.i < self.b.len() && self.b[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                if matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
                    self.number_tail();
                    Json::Other
                } else {
                    let t = std::str::from_utf8(&self.b[start..self.i]).unwrap();
                    Json::Int(
                        t.parse()
                            .map_err(|_| bad(format!("header JSON: integer {t} too large")))?,
                    )
                }
            }
            Some(b'-') => {
                self.i += 1;
                self.number_tail();
                Json::Other
            }
            Some(b't') | Some(b'f') | Some(b'n') => {
                for w in ["true", "false", "null"] {
                    if self.b[self.i..].starts_with(w.as_bytes()) {
                        self.i += w.len();
                        self.depth -= 1;
                        return Ok(Json::Other);
                    }
                }
                return Err(bad(format!("header JSON: bad literal at byte {}", self.i)));
            }
            _ => return Err(bad(format!("header JSON: unexpected byte at {}", self.i))),
        };
        self.depth -= 1;
        Ok(v)
    }

    fn number_tail(&mut self) {
        while self.i < self.b.len()
            && matches!(
                self.b[self.i],
                b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'
            )
        {
            self.i += 1;
        }
    }

    fn string(&mut self) -> Result<String> {
        if self.b.get(self.i) != Some(&b'"') {
            return Err(bad(format!(
                "header JSON: expected a string at byte {}",
                self.i
            )));
        }
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.b.len() && self.b[self.i] != b'"' && self.b[self.i] != b'\\' {
                self.i += 1;
            }
            // The input is a &str and the run stops at an ASCII byte: a whole UTF-8 run.
            out.push_str(std::str::from_utf8(&self.b[start..self.i]).unwrap());
            match self.b.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    let c = *self
                        .b
                        .get(self.i + 1)
                        .ok_or_else(|| bad("header JSON: unterminated string"))?;
                    self.i += 2;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = self
                                .b
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(|| bad("header JSON: bad \\u escape"))?;
                            self.i += 4;
                            // Surrogate pairs are not needed by safetensors names; a lone one is replaced.
                            out.push(char::from_u32(hex).unwrap_or('\u{fffd}'));
                        }
                        _ => {
                            return Err(bad(format!(
                                "header JSON: bad escape at byte {}",
                                self.i - 1
                            )))
                        }
                    }
                }
                _ => return Err(bad("header JSON: unterminated string")),
            }
        }
    }
}

/// A file of named packed layers being written (the packed formats' on-disk form): metadata
/// `format`, `version` and one header string per layer, then each layer's tensors.
pub(crate) struct LayerFileWriter {
    meta: Vec<(String, String)>,
    tensors: Vec<(String, &'static str, Vec<usize>, Vec<u8>)>,
}

impl LayerFileWriter {
    pub(crate) fn new(format: &str, version: u32) -> Self {
        LayerFileWriter {
            meta: vec![
                ("format".to_string(), format.to_string()),
                ("version".to_string(), version.to_string()),
            ],
            tensors: Vec::new(),
        }
    }

    /// Registers layer `name` with its header: names must be non-empty, without `;` and `=`, not
    /// `format`/`version`, and unique.
    pub(crate) fn layer(&mut self, name: &str, header: String) -> Result<()> {
        if name.is_empty() || name.contains([';', '=']) || ["format", "version"].contains(&name) {
            return Err(Error::invalid("layers", format!("layer name {name:?}")));
        }
        if self.meta.iter().any(|(k, _)| k == name) {
            return Err(Error::invalid("layers", format!("layer {name:?} twice")));
        }
        self.meta.push((name.to_string(), header));
        Ok(())
    }

    pub(crate) fn tensor(
        &mut self,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) {
        self.tensors.push((name, dtype, shape, data));
    }

    pub(crate) fn finish(self) -> Result<Vec<u8>> {
        let m: Vec<(&str, &str)> = self
            .meta
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        write(&self.tensors, &m)
    }
}

/// Little-endian bytes of 32-bit words.
pub(crate) fn le_words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Little-endian bytes of 16-bit values.
pub(crate) fn le_halves(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// 32-bit words from little-endian bytes.
pub(crate) fn words_le(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// 16-bit values from little-endian bytes.
pub(crate) fn halves_le(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Reading a file of packed layers: the format and version checked, then each layer's header, its
/// tensors taken by suffix with their dtype and shape checked, and at the end every tensor accounted
/// for.
pub(crate) struct LayerFileReader<'a> {
    st: SafeTensors<'a>,
    used: usize,
}

impl<'a> LayerFileReader<'a> {
    /// Parses `bytes`; another `format` is `Err(InvalidArgument)`, another `version`
    /// `Err(Unsupported)` naming `what`.
    pub(crate) fn open(bytes: &'a [u8], format: &str, version: u32, what: &str) -> Result<Self> {
        let st = SafeTensors::parse(bytes)?;
        let meta = st.metadata();
        let got = meta.get("format").map(String::as_str);
        if got != Some(format) {
            return Err(Error::invalid(
                "safetensors",
                format!("format {got:?}, not {format:?}"),
            ));
        }
        let v = meta.get("version").cloned().unwrap_or_default();
        if v != version.to_string() {
            return Err(Error::Unsupported {
                what: format!("{what} format version {v:?} (this build reads version {version})"),
            });
        }
        Ok(LayerFileReader { st, used: 0 })
    }

    /// The layers' `(name, header)`, in name order.
    pub(crate) fn layers(&self) -> Vec<(String, String)> {
        self.st
            .metadata()
            .iter()
            .filter(|(k, _)| *k != "format" && *k != "version")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The bytes of tensor `layer.suffix`, which must have `dtype` and `shape`.
    pub(crate) fn take(
        &mut self,
        layer: &str,
        suffix: &str,
        dtype: &str,
        shape: Vec<usize>,
    ) -> Result<&'a [u8]> {
        let t = self.st.tensor(&format!("{layer}.{suffix}"))?;
        if t.dtype != dtype || t.shape != shape {
            return Err(Error::invalid(
                "safetensors",
                format!(
                    "layer {layer:?}: {suffix} is {} {:?}, the header implies {dtype} {shape:?}",
                    t.dtype, t.shape
                ),
            ));
        }
        self.used += 1;
        Ok(t.data)
    }

    /// `Err` unless every tensor of the file was taken.
    pub(crate) fn finish(self) -> Result<()> {
        let total = self.st.names().count();
        if self.used != total {
            return Err(Error::invalid(
                "safetensors",
                format!(
                    "{total} tensors, of which the layer headers name {}",
                    self.used
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_files_are_errors_not_panics() {
        let good = write(
            &[
                ("a", "U8", vec![2, 2], vec![1, 2, 3, 4]),
                ("b", "F32", vec![1], vec![0, 0, 128, 63]),
            ],
            &[("k", "v\"q")],
        )
        .unwrap();
        let st = SafeTensors::parse(&good).unwrap();
        assert_eq!(st.tensor("b").unwrap().to_f32().unwrap(), vec![1.0]);
        assert_eq!(st.metadata()["k"], "v\"q");
        // Every truncation and every single-byte corruption of the header is an Err or a valid parse.
        for cut in 0..good.len() {
            let _ = SafeTensors::parse(&good[..cut]);
        }
        let hlen = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        for i in 0..8 + hlen {
            for v in [0u8, b'"', b'{', b'9', 0xff] {
                let mut f = good.clone();
                f[i] = v;
                let _ = SafeTensors::parse(&f);
            }
        }
        // Overlapping and out-of-range tensors.
        let mk = |h: &str| {
            let mut f = (h.len() as u64).to_le_bytes().to_vec();
            f.extend_from_slice(h.as_bytes());
            f.extend_from_slice(&[0u8; 8]);
            f
        };
        assert!(SafeTensors::parse(&mk(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#)).is_err());
        assert!(SafeTensors::parse(&mk(
            r#"{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}"#
        ))
        .is_err());
        assert!(SafeTensors::parse(&mk(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#
        ))
        .is_err());
        assert!(SafeTensors::parse(&mk(
            r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#
        ))
        .is_err());
        assert!(SafeTensors::parse(&mk(
            r#"{"a":{"dtype":"U8","shape":[99999999999999999999],"data_offsets":[0,1]}}"#
        ))
        .is_err());
        assert!(SafeTensors::parse(&mk(&"[".repeat(1000))).is_err());
        // Shapes whose product overflows, each dimension fitting; a name twice.
        assert!(SafeTensors::parse(&mk(
            r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#
        ))
        .is_err());
        assert!(SafeTensors::parse(&mk(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#)).is_err());
        assert!(write(&[("a", "U8", vec![usize::MAX, 2], vec![])], &[]).is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let nest = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        assert!(Json::parse(&nest(60)).is_ok());
        let deep = Json::parse(&nest(65)).unwrap_err().to_string();
        assert!(deep.contains("deeper"), "{deep}");
    }
}
