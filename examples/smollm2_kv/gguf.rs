//! A small GGUF (version 3) reader: the metadata, the tensor table, and the dequantisation of F32, F16,
//! Q8_0 and Q4_1 tensors to f32 (what SmolLM2-135M-Instruct.Q4_1.gguf holds).
//!
//! Layout (ggml's `gguf.c`): magic `GGUF`, version u32, tensor count u64, metadata count u64; the
//! metadata (key string, value type u32, value); the tensor infos (name, dim count u32, dims u64 with
//! the innermost first, type u32, offset u64 from the data section); the data section, aligned to
//! `general.alignment` (32 by default). Strings are a u64 length and UTF-8 bytes; all little-endian.

use std::collections::HashMap;

/// A metadata value (integers widened, booleans as 0 or 1).
#[derive(Clone, Debug)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Value>),
}

/// Where a tensor lies and how it is stored.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Dimensions, innermost (contiguous) first, as ggml's `ne`.
    pub dims: Vec<u64>,
    /// ggml type: 0 F32, 1 F16, 3 Q4_1, 8 Q8_0 are read here.
    pub ty: u32,
    offset: u64,
}

/// A parsed GGUF file held in memory.
pub struct Gguf {
    pub meta: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("GGUF truncated at byte {}", self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|e| e.to_string())
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
    }
    fn value(&mut self, ty: u32) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::Uint(self.arr::<1>()?[0] as u64),
            1 => Value::Int(self.arr::<1>()?[0] as i8 as i64),
            2 => Value::Uint(u16::from_le_bytes(self.arr()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.arr()?) as i64),
            4 => Value::Uint(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.arr()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.arr()?) as f64),
            7 => Value::Uint(u64::from(self.arr::<1>()?[0] != 0)),
            8 => Value::Str(self.string()?),
            9 => {
                let (ety, n) = (self.u32()?, self.len()?);
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety)?);
                }
                Value::Array(v)
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.arr()?)),
            12 => Value::Float(f64::from_le_bytes(self.arr()?)),
            t => return Err(format!("GGUF metadata type {t} unknown")),
        })
    }
}

impl Gguf {
    /// Reads and parses the whole file.
    pub fn open(path: &std::path::Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c = Cursor { b: &bytes, pos: 0 };
        if c.take(4)? != b"GGUF" {
            return Err(format!("{} is not a GGUF file", path.display()));
        }
        let version = c.u32()?;
        if version != 3 {
            return Err(format!("GGUF version {version}; this reader knows 3"));
        }
        let (n_tensors, n_meta) = (c.len()?, c.len()?);
        let mut meta = HashMap::new();
        for _ in 0..n_meta {
            let key = c.string()?;
            let ty = c.u32()?;
            meta.insert(key, c.value(ty)?);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
            let (ty, offset) = (c.u32()?, c.u64()?);
            tensors.insert(name, TensorInfo { dims, ty, offset });
        }
        let align = match meta.get("general.alignment") {
            Some(Value::Uint(a)) if *a > 0 => *a as usize,
            _ => 32,
        };
        let data_start = c.pos.div_ceil(align) * align;
        Ok(Gguf {
            meta,
            tensors,
            bytes,
            data_start,
        })
    }

    /// An integer metadata value.
    pub fn uint(&self, key: &str) -> Result<usize, String> {
        match self.meta.get(key) {
            Some(Value::Uint(v)) => Ok(*v as usize),
            Some(Value::Int(v)) if *v >= 0 => Ok(*v as usize),
            other => Err(format!(
                "GGUF metadata {key}: expected an integer, found {other:?}"
            )),
        }
    }

    /// A float metadata value.
    pub fn float(&self, key: &str) -> Result<f64, String> {
        match self.meta.get(key) {
            Some(Value::Float(v)) => Ok(*v),
            other => Err(format!(
                "GGUF metadata {key}: expected a float, found {other:?}"
            )),
        }
    }

    /// A string array metadata value (the vocabulary).
    pub fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        match self.meta.get(key) {
            Some(Value::Array(v)) => v
                .iter()
                .map(|x| match x {
                    Value::Str(s) => Ok(s.clone()),
                    other => Err(format!("GGUF metadata {key}: non-string {other:?}")),
                })
                .collect(),
            other => Err(format!(
                "GGUF metadata {key}: expected an array, found {other:?}"
            )),
        }
    }

    /// The tensor `name` dequantised to f32, with its dims (innermost first).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("GGUF tensor {name} missing"))?;
        let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
        let n: usize = dims.iter().product();
        // (block elements, block bytes)
        let (be, bb) = match info.ty {
            0 => (1, 4),
            1 => (1, 2),
            3 => (32, 20),
            8 => (32, 34),
            t => {
                return Err(format!(
                    "GGUF tensor {name}: ggml type {t} not supported here"
                ))
            }
        };
        if n % be != 0 {
            return Err(format!(
                "GGUF tensor {name}: {n} elements, not whole blocks"
            ));
        }
        let start = self.data_start + info.offset as usize;
        let raw = self
            .bytes
            .get(start..start + n / be * bb)
            .ok_or_else(|| format!("GGUF tensor {name} runs past the end of the file"))?;
        let h = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut out = Vec::with_capacity(n);
        match info.ty {
            0 => out.extend(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            ),
            1 => out.extend(raw.chunks_exact(2).map(h)),
            // Q4_1: f16 scale d, f16 minimum m, 16 bytes of nibbles; element j < 16 is the low nibble
            // of byte j, element j + 16 its high nibble; x = d·q + m.
            3 => {
                for b in raw.chunks_exact(bb) {
                    let (d, m) = (h(&b[0..2]), h(&b[2..4]));
                    let q = &b[4..20];
                    out.extend(q.iter().map(|&x| d * (x & 15) as f32 + m));
                    out.extend(q.iter().map(|&x| d * (x >> 4) as f32 + m));
                }
            }
            // Q8_0: f16 scale d, 32 signed bytes; x = d·q.
            8 => {
                for b in raw.chunks_exact(bb) {
                    let d = h(&b[0..2]);
                    out.extend(b[2..34].iter().map(|&x| d * x as i8 as f32));
                }
            }
            _ => unreachable!("type checked above"),
        }
        Ok((out, dims))
    }
}
