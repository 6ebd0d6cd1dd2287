//! The callables a `torch.save` pickle may name, and what calling them builds: the tensor and
//! parameter rebuilders, `OrderedDict` and the storage types, interpreted here, never run
//! ([`super::unpickle`] refuses any other global).

use std::rc::Rc;

use super::unpickle::Value;
use super::TorchDType;

/// A callable the pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    Storage(TorchDType),
}

impl Global {
    pub(super) fn resolve(module: &str, name: &str) -> Result<Global, String> {
        Ok(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch", "FloatStorage") => Global::Storage(TorchDType::F32),
            ("torch", "HalfStorage") => Global::Storage(TorchDType::F16),
            ("torch", "BFloat16Storage") => Global::Storage(TorchDType::BF16),
            ("torch", s) if s.ends_with("Storage") => {
                return Err(format!(
                    "storage type torch.{s} is not supported (FloatStorage, HalfStorage and BFloat16Storage are)"
                ))
            }
            _ => {
                return Err(format!(
                    "refusing the pickle global {module}.{name}: only torch's tensor and storage \
                     rebuilders and collections.OrderedDict are allowed"
                ))
            }
        })
    }
}

/// A storage reference: `('storage', torch.XStorage, key, location, numel)`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: TorchDType,
    pub numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view of a storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

fn int(v: &Value, what: &str) -> Result<usize, String> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!(
            "{what}: expected a non-negative int, found {}",
            other.kind()
        )),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    match v {
        Value::Tuple(t) => t.items.iter().map(|x| int(x, what)).collect(),
        other => Err(format!("{what}: expected a tuple, found {}", other.kind())),
    }
}

/// `('storage', torch.XStorage, key, location, numel)` as a storage reference.
pub(super) fn storage_ref(pid: &Value) -> Result<StorageRef, String> {
    let bad = || "a persistent id other than ('storage', type, key, location, numel)".to_string();
    let Value::Tuple(t) = pid else {
        return Err(bad());
    };
    match &t.items[..] {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_location), numel]
            if &**tag == "storage" =>
        {
            Ok(StorageRef {
                key: key.to_string(),
                dtype: *dtype,
                numel: int(numel, "storage size")?,
            })
        }
        _ => Err(bad()),
    }
}

pub(super) enum Reduced {
    Value(Value),
    EmptyDict,
}

fn empty_or_none(v: &Value) -> bool {
    match v {
        Value::None => true,
        Value::Dict(d) => d.items.is_empty(),
        _ => false,
    }
}

/// What calling `func(*args)` builds, for the few callables allowed.
pub(super) fn reduce(func: &Value, args: &Value) -> Result<Reduced, String> {
    let Value::Tuple(args) = args else {
        return Err(format!(
            "REDUCE with {} arguments instead of a tuple",
            args.kind()
        ));
    };
    let a = &args.items[..];
    let Value::Global(g) = func else {
        return Err(format!(
            "REDUCE calls a {}, not an allowed global",
            func.kind()
        ));
    };
    match g {
        Global::RebuildTensorV2 => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if !(6..=7).contains(&a.len()) {
                return Err(format!("_rebuild_tensor_v2 with {} arguments", a.len()));
            }
            let Value::Storage(s) = &a[0] else {
                return Err(format!(
                    "_rebuild_tensor_v2 of a {}, not a storage",
                    a[0].kind()
                ));
            };
            if !empty_or_none(&a[5]) || a.get(6).is_some_and(|m| !empty_or_none(m)) {
                return Err("tensors with backward hooks or metadata are not supported".into());
            }
            let size = ints(&a[2], "tensor size")?;
            let stride = ints(&a[3], "tensor stride")?;
            if size.len() != stride.len() {
                return Err(format!(
                    "tensor size {size:?} and stride {stride:?} differ in length"
                ));
            }
            Ok(Reduced::Value(Value::Tensor(Rc::new(TensorRef {
                storage: (**s).clone(),
                offset: int(&a[1], "storage offset")?,
                size,
                stride,
            }))))
        }
        Global::RebuildParameter => match a {
            [t @ Value::Tensor(_), Value::Bool(_), hooks] if empty_or_none(hooks) => {
                Ok(Reduced::Value(t.clone()))
            }
            _ => Err("_rebuild_parameter with arguments other than (tensor, bool, {})".into()),
        },
        Global::OrderedDict if a.is_empty() => Ok(Reduced::EmptyDict),
        Global::OrderedDict => Err("OrderedDict called with arguments".into()),
        Global::Storage(_) => Err("a storage type called as a function".into()),
    }
}
