//! The JSON Patch kips answers with: operations built from JSON pointers, and containers
//! kips rendered itself carried as raw JSON.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, RemoveOperation, ReplaceOperation};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// JSON pointer from tokens; tokens are escaped (`/` → `~1`, `~` → `~0`) by jsonptr.
pub fn pointer<'t>(tokens: impl IntoIterator<Item = &'t str>) -> PointerBuf {
    PointerBuf::from_tokens(tokens)
}

/// Parses `text` as a JSON pointer written in the usual `/a/b/0` form.
pub fn parse_pointer(text: &str) -> PointerBuf {
    PointerBuf::parse(text).expect("kips writes only valid JSON pointers")
}

/// One JSON Patch operation of a [`Mutation`](super::Mutation).
#[derive(Debug, Clone)]
pub enum PatchOp {
    Json(PatchOperation),
    /// An `add` of JSON that kips rendered itself (its containers): serialised once, hashed
    /// for the status digest, and copied into the response as it is, never held as a tree.
    AddRendered {
        path: PointerBuf,
        value: Box<RawValue>,
    },
}

impl PatchOp {
    /// The operation as json-patch applies it.
    pub fn to_operation(&self) -> PatchOperation {
        match self {
            PatchOp::Json(operation) => operation.clone(),
            PatchOp::AddRendered { path, value } => PatchOperation::Add(AddOperation {
                path: path.clone(),
                value: serde_json::from_str(value.get()).expect("kips renders valid JSON"),
            }),
        }
    }
}

/// Compares operations as json-patch would apply them (used by tests; never while admitting).
impl PartialEq for PatchOp {
    fn eq(&self, other: &Self) -> bool {
        self.to_operation() == other.to_operation()
    }
}

impl Serialize for PatchOp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PatchOp::Json(operation) => operation.serialize(serializer),
            PatchOp::AddRendered { path, value } => {
                let mut op = serializer.serialize_struct("PatchOp", 3)?;
                op.serialize_field("op", "add")?;
                op.serialize_field("path", path)?;
                op.serialize_field("value", value)?;
                op.end()
            }
        }
    }
}

/// `ops` as a patch json-patch can apply.
pub fn to_json_patch(ops: &[PatchOp]) -> Vec<PatchOperation> {
    ops.iter().map(PatchOp::to_operation).collect()
}

pub fn add(path: PointerBuf, value: Value) -> PatchOp {
    PatchOp::Json(PatchOperation::Add(AddOperation { path, value }))
}

pub fn replace(path: PointerBuf, value: Value) -> PatchOp {
    PatchOp::Json(PatchOperation::Replace(ReplaceOperation { path, value }))
}

pub fn remove(path: PointerBuf) -> PatchOp {
    PatchOp::Json(PatchOperation::Remove(RemoveOperation { path }))
}
