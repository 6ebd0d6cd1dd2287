//! A restricted pickle reader for `torch.save`'s `data.pkl`: it rebuilds a dict of tensor
//! descriptions and never runs anything.
//!
//! It knows the opcodes that Python's pickler (protocols 2 to 5) emits for a dict or
//! `OrderedDict` of tensors: containers (dict, list, tuple), ints, floats, strings, bools, None,
//! the memo (`BINPUT`, `MEMOIZE`, `BINGET`, ...), `FRAME`, `BINPERSID` (torch's storage
//! references), `REDUCE` and an empty `BUILD`. The only callables it accepts are
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
//! `collections.OrderedDict` and the storage types `torch.FloatStorage`, `torch.HalfStorage`
//! and `torch.BFloat16Storage`, each interpreted here rather than called; any other global
//! (`os.system`, say) or opcode is an error naming it. Containers nest at most
//! [`MAX_DEPTH`] deep, and values are shared rather than copied, so a hostile file can neither
//! exhaust the stack nor blow up memory beyond its own size.

use std::collections::HashMap;
use std::rc::Rc;

use super::torch_globals::{reduce, storage_ref, Reduced};
pub use super::torch_globals::{Global, StorageRef, TensorRef};

/// The deepest nesting of containers accepted (a state dict needs 3).
pub const MAX_DEPTH: usize = 32;

/// A container's items with its nesting depth and identity (for the memo's bookkeeping).
#[derive(Clone, Debug)]
pub struct Container<T> {
    pub items: Vec<T>,
    depth: usize,
    id: usize,
}

/// A value on the pickle machine's stack.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Tuple(Rc<Container<Value>>),
    List(Rc<Container<Value>>),
    Dict(Rc<Container<(Value, Value)>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(c) | Value::List(c) => c.depth,
            Value::Dict(c) => c.depth,
            _ => 0,
        }
    }

    /// What the value is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Runs the pickle `data` and returns the object it builds.
pub fn unpickle(data: &[u8]) -> Result<Value, String> {
    let mut vm = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        memo_of: HashMap::new(),
        next_id: 0,
    };
    vm.run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    /// Memo slots; `None` marks a dict or list changed after it was memoized.
    memo: HashMap<u32, Option<Value>>,
    /// Container id -> the memo slots holding it.
    memo_of: HashMap<usize, Vec<u32>>,
    next_id: usize,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("pickle truncated at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("pickle GLOBAL at byte {}: no end of line", self.pos))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| format!("pickle GLOBAL at byte {}: not UTF-8", self.pos))?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: u64) -> Result<Value, String> {
        let at = self.pos;
        let n = usize::try_from(n).map_err(|_| format!("pickle string at byte {at} too long"))?;
        let s = std::str::from_utf8(self.take(n)?)
            .map_err(|_| format!("pickle string at byte {at}: not UTF-8"))?;
        Ok(Value::Str(s.into()))
    }

    fn pop(&mut self) -> Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(format!(
                "pickle stack underflow (at a mark) at byte {}",
                self.pos
            ));
        }
        self.stack
            .pop()
            .ok_or_else(|| format!("pickle stack underflow at byte {}", self.pos))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("pickle: no mark to pop at byte {}", self.pos))?;
        Ok(self.stack.split_off(m))
    }

    fn id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    fn container<T>(&mut self, items: Vec<T>, depth: usize) -> Result<Rc<Container<T>>, String> {
        if depth > MAX_DEPTH {
            return Err(format!("pickle nests containers deeper than {MAX_DEPTH}"));
        }
        Ok(Rc::new(Container {
            items,
            depth,
            id: self.id(),
        }))
    }

    fn tuple(&mut self, items: Vec<Value>) -> Result<Value, String> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        Ok(Value::Tuple(self.container(items, depth)?))
    }

    fn put(&mut self, slot: u32) -> Result<(), String> {
        let top = self
            .stack
            .last()
            .ok_or_else(|| format!("pickle: memoizing an empty stack at byte {}", self.pos))?
            .clone();
        if let Value::List(c) = &top {
            self.memo_of.entry(c.id).or_default().push(slot);
        } else if let Value::Dict(c) = &top {
            self.memo_of.entry(c.id).or_default().push(slot);
        }
        self.memo.insert(slot, Some(top));
        Ok(())
    }

    fn get(&mut self, slot: u32) -> Result<(), String> {
        match self.memo.get(&slot) {
            Some(Some(v)) => {
                let v = v.clone();
                self.stack.push(v);
                Ok(())
            }
            Some(None) => Err(format!(
                "pickle refers back to memo {slot}, a dict or list changed since (not supported)"
            )),
            None => Err(format!("pickle reads memo {slot}, never written")),
        }
    }

    /// The memo slots of container `id` no longer hold its current value.
    fn changed(&mut self, id: usize) {
        for slot in self.memo_of.remove(&id).unwrap_or_default() {
            self.memo.insert(slot, None);
        }
    }

    fn top_dict_insert(&mut self, pairs: Vec<(Value, Value)>) -> Result<(), String> {
        let at = self.pos;
        let Some(Value::Dict(mut d)) = self.stack.pop() else {
            return Err(format!(
                "pickle SETITEM(S) at byte {at} on something not a dict"
            ));
        };
        self.changed(d.id);
        let depth = pairs
            .iter()
            .map(|(k, v)| 1 + k.depth().max(v.depth()))
            .max()
            .unwrap_or(0)
            .max(d.depth);
        if depth > MAX_DEPTH {
            return Err(format!("pickle nests containers deeper than {MAX_DEPTH}"));
        }
        let dm = Rc::make_mut(&mut d);
        dm.depth = depth;
        dm.items.extend(pairs);
        self.stack.push(Value::Dict(d));
        Ok(())
    }

    fn top_list_extend(&mut self, items: Vec<Value>) -> Result<(), String> {
        let at = self.pos;
        let Some(Value::List(mut l)) = self.stack.pop() else {
            return Err(format!(
                "pickle APPEND(S) at byte {at} on something not a list"
            ));
        };
        self.changed(l.id);
        let depth = items
            .iter()
            .map(|v| 1 + v.depth())
            .max()
            .unwrap_or(0)
            .max(l.depth);
        if depth > MAX_DEPTH {
            return Err(format!("pickle nests containers deeper than {MAX_DEPTH}"));
        }
        let lm = Rc::make_mut(&mut l);
        lm.depth = depth;
        lm.items.extend(items);
        self.stack.push(Value::List(l));
        Ok(())
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(format!("pickle protocol {p} is not supported (2 to 5 are)"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let v = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err("pickle stops with values left on its stack".into());
                    }
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => {
                    let c = self.container(Vec::new(), 1)?;
                    self.stack.push(Value::Dict(c));
                }
                b']' => {
                    let c = self.container(Vec::new(), 1)?;
                    self.stack.push(Value::List(c));
                }
                b')' => {
                    let t = self.tuple(Vec::new())?;
                    self.stack.push(t);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.tuple(items)?;
                    self.stack.push(t);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let t = self.tuple(items)?;
                    self.stack.push(t);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v.into()));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("pickle integer at byte {at} wider than 64 bits"));
                    }
                    let b = self.take(n)?;
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xFF; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()?;
                    let s = self.string(n.into())?;
                    self.stack.push(s);
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.string(n.into())?;
                    self.stack.push(s);
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack
                        .push(Value::Global(Global::resolve(&module, &name)?));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        return Err(format!(
                            "pickle STACK_GLOBAL at byte {at} without two strings"
                        ));
                    };
                    self.stack.push(Value::Global(Global::resolve(m, n)?));
                }
                b'q' => {
                    let slot = self.u8()?;
                    self.put(slot.into())?;
                }
                b'r' => {
                    let slot = self.u32()?;
                    self.put(slot)?;
                }
                0x94 => {
                    let slot = u32::try_from(self.memo.len())
                        .map_err(|_| "pickle memo too large".to_string())?;
                    self.put(slot)?;
                }
                b'h' => {
                    let slot = self.u8()?;
                    self.get(slot.into())?;
                }
                b'j' => {
                    let slot = self.u32()?;
                    self.get(slot)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage =
                        storage_ref(&pid).map_err(|e| format!("pickle at byte {at}: {e}"))?;
                    self.stack.push(Value::Storage(Rc::new(storage)));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v =
                        reduce(&func, &args).map_err(|e| format!("pickle at byte {at}: {e}"))?;
                    let v = match v {
                        Reduced::Value(v) => v,
                        Reduced::EmptyDict => Value::Dict(self.container(Vec::new(), 1)?),
                    };
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let empty = match &state {
                        Value::None => true,
                        Value::Dict(d) => d.items.is_empty(),
                        _ => false,
                    };
                    if !empty || self.stack.is_empty() {
                        return Err(format!(
                            "pickle BUILD at byte {at}: object state ({}) is not supported",
                            state.kind()
                        ));
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.top_dict_insert(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(format!(
                            "pickle SETITEMS at byte {at} with an odd item count"
                        ));
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    self.top_dict_insert(pairs)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.top_list_extend(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.top_list_extend(items)?;
                }
                _ => {
                    let shown = if op.is_ascii_graphic() {
                        format!(" ('{}')", op as char)
                    } else {
                        String::new()
                    };
                    return Err(format!(
                        "unsupported pickle opcode 0x{op:02x}{shown} at byte {at}"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_containers_and_scalars() {
        // {'a': (1, -2, 3.5, 'x', None, True), 'b': [300, 70000, 2**40]} with memo reuse.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([b'X', 1, 0, 0, 0, b'a', b'q', 1]);
        p.extend([b'(', b'K', 1, b'J']);
        p.extend((-2i32).to_le_bytes());
        p.push(b'G');
        p.extend(3.5f64.to_be_bytes());
        p.extend([0x8c, 1, b'x', b'N', 0x88, b't', b'q', 2]);
        p.extend([b'X', 1, 0, 0, 0, b'b', b']', b'(', b'M']);
        p.extend(300u16.to_le_bytes());
        p.extend([0x8a, 3, 0x70, 0x11, 0x01]); // 70000
        p.extend([0x8a, 6, 0, 0, 0, 0, 0, 1]); // 2**40
        p.extend([b'e', b'u', b'.']);
        let v = unpickle(&p).unwrap();
        let Value::Dict(d) = v else { panic!("{v:?}") };
        assert_eq!(d.items.len(), 2);
        let Value::Tuple(t) = &d.items[0].1 else {
            panic!()
        };
        assert!(
            matches!(t.items[..], [Value::Int(1), Value::Int(-2), Value::Float(f), Value::Str(_), Value::None, Value::Bool(true)] if f == 3.5)
        );
        let Value::List(l) = &d.items[1].1 else {
            panic!()
        };
        assert!(matches!(
            l.items[..],
            [
                Value::Int(300),
                Value::Int(70000),
                Value::Int(0x100_0000_0000)
            ]
        ));
    }

    #[test]
    fn refuses_unknown_globals_opcodes_and_deep_nesting() {
        let e = unpickle(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lst\x85R.").unwrap_err();
        assert!(e.contains("refusing the pickle global os.system"), "{e}");
        let e = unpickle(b"\x80\x02ctorch\nDoubleStorage\n.").unwrap_err();
        assert!(e.contains("torch.DoubleStorage is not supported"), "{e}");
        let e = unpickle(b"\x80\x02I42\n.").unwrap_err();
        assert!(e.contains("unsupported pickle opcode 0x49 ('I')"), "{e}");
        let mut deep = vec![0x80, 2, b')'];
        deep.extend(std::iter::repeat_n(0x85u8, 100_000));
        deep.push(b'.');
        assert!(unpickle(&deep).unwrap_err().contains("deeper than"));
        assert!(unpickle(b"\x80\x02}").unwrap_err().contains("truncated"));
        // A dict changed after being memoized, then read back.
        let e = unpickle(b"\x80\x02}q\x00K\x01K\x02sh\x00\x86.").unwrap_err();
        assert!(e.contains("changed since"), "{e}");
    }
}
