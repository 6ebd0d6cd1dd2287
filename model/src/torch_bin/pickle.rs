//! Writes the `data.pkl` of `torch.save(dict_of_tensors)`: the opcodes Python's pickler
//! (protocol 2, torch's default) emits for a plain dict whose values are contiguous tensors, each
//! on its own storage. `torch.load(path, weights_only=True)` accepts it: the only globals are
//! `torch._utils._rebuild_tensor_v2`, `collections.OrderedDict` (the empty backward hooks) and
//! the storage types.

use std::collections::HashMap;

use super::TorchDType;

/// A tensor to pickle: its name, dtype and shape; its storage key is its index.
pub struct Pickled<'a> {
    pub name: &'a str,
    pub dtype: TorchDType,
    pub shape: &'a [usize],
}

/// Python's `pickle` batches dict items by this many per `SETITEMS`.
const BATCH: usize = 1000;

#[derive(Default)]
struct Emitter {
    out: Vec<u8>,
    next_memo: u32,
    /// Globals and interned strings already written: their memo slot.
    memo: HashMap<String, u32>,
}

impl Emitter {
    fn put(&mut self) -> u32 {
        let slot = self.next_memo;
        if slot < 256 {
            self.out.extend([b'q', slot as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend(slot.to_le_bytes());
        }
        self.next_memo += 1;
        slot
    }

    fn get(&mut self, slot: u32) {
        if slot < 256 {
            self.out.extend([b'h', slot as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend(slot.to_le_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
        self.put();
    }

    /// A string Python interns (a literal): written once, then read from the memo.
    fn interned(&mut self, s: &str) {
        let key = format!("str:{s}");
        match self.memo.get(&key) {
            Some(&slot) => self.get(slot),
            None => {
                self.str(s);
                self.memo.insert(key, self.next_memo - 1);
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = format!("global:{module}.{name}");
        match self.memo.get(&key) {
            Some(&slot) => self.get(slot),
            None => {
                self.out.push(b'c');
                self.out.extend(format!("{module}\n{name}\n").as_bytes());
                let slot = self.put();
                self.memo.insert(key, slot);
            }
        }
    }

    /// `save_long` of Python's pickler (protocol 2).
    fn int(&mut self, v: usize) {
        if v <= 0xFF {
            self.out.extend([b'K', v as u8]);
        } else if v <= 0xFFFF {
            self.out.push(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if v <= 0x7FFF_FFFF {
            self.out.push(b'J');
            self.out.extend((v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement with a sign byte when the top bit is set.
            let bits = usize::BITS - v.leading_zeros();
            let n = (bits / 8 + 1) as usize;
            self.out.extend([0x8a, n as u8]);
            self.out.extend(&(v as u128).to_le_bytes()[..n]);
        }
    }

    fn int_tuple(&mut self, v: &[usize]) {
        if v.is_empty() {
            self.out.push(b')');
            return;
        }
        if v.len() > 3 {
            self.out.push(b'(');
        }
        for &x in v {
            self.int(x);
        }
        self.out.push(match v.len() {
            1 => 0x85,
            2 => 0x86,
            3 => 0x87,
            _ => b't',
        });
        self.put();
    }

    /// `_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`, storage `key`.
    fn tensor(&mut self, t: &Pickled, key: usize) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'('); // the six arguments
                             // The storage's persistent id: ('storage', torch.XStorage, key, 'cpu', numel).
        self.out.push(b'(');
        self.interned("storage");
        self.global("torch", t.dtype.storage_name());
        self.str(&key.to_string());
        self.interned("cpu");
        self.int(t.shape.iter().product());
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(0); // storage offset
        self.int_tuple(t.shape);
        self.int_tuple(&contiguous_strides(t.shape));
        self.out.push(0x89); // requires_grad = False
        self.global("collections", "OrderedDict");
        self.out.extend([b')', b'R']);
        self.put();
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }
}

/// Row-major strides of `shape`, in elements.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// The pickle of `{name: tensor}` in `tensors`' order, tensor `i` on storage key `i`.
pub fn pickle_state_dict(tensors: &[Pickled]) -> Vec<u8> {
    let mut e = Emitter::default();
    e.out.extend([0x80, 2, b'}']);
    e.put();
    for (batch_start, batch) in tensors.chunks(BATCH).enumerate() {
        let base = batch_start * BATCH;
        if batch.len() > 1 {
            e.out.push(b'(');
        }
        for (i, t) in batch.iter().enumerate() {
            e.str(t.name);
            e.tensor(t, base + i);
        }
        e.out.push(if batch.len() > 1 { b'u' } else { b's' });
    }
    e.out.push(b'.');
    e.out
}
