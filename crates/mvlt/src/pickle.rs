//! A bounded pickle reader: the opcodes `torch.save` and plain Python data use (protocols 0 to 5),
//! interpreted as data, never executed.
//!
//! Written by hand because the crates at hand trust their input: burn-store's reader and
//! serde-pickle copy a memo entry on every reference (a 222-byte "memo bomb" whose entries refer 10
//! times to the one before, 9 levels deep, asks for 10^9 copies), recurse once per nesting level
//! (a million nested lists overflow the stack) and zero-fill what a file leaves out. Here the
//! objects live in one arena and refer to each other by index: a memo reference costs one index,
//! nothing is dropped or walked recursively by the reader, and the arena, the memo, the stack and
//! the opcodes executed are each capped ([`Limits`]). Whoever walks the result does so through a
//! [`Walk`], which bounds the depth and the number of objects visited, so that a graph that fans
//! out (the memo bomb) or loops (a list appended to itself) ends with an error, not a hang.

use anyhow::{bail, Result};
use std::collections::HashMap;

/// An object's place in [`Pickle::objects`].
pub type Id = u32;

/// What a pickle holds. Containers refer to their items by [`Id`]; a class instance is the call
/// that would have built it ([`Object::Call`]), never run.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside i64: LONG1/LONG4's little-endian bytes (empty when written as text).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    /// Lists, sets and frozensets.
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// `module.name` (GLOBAL, STACK_GLOBAL, INST's class).
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)` (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ), with what later opcodes gave the
    /// result: items (SETITEM(S) on an OrderedDict), appended items (APPEND(S) on a list
    /// subclass), and its state (BUILD).
    Call {
        callable: Id,
        args: Id,
        items: Vec<(Id, Id)>,
        appended: Vec<Id>,
        state: Option<Id>,
    },
    /// A persistent id (PERSID, BINPERSID): PyTorch's reference to a tensor storage.
    Persistent(Id),
}

/// What one pickle may cost. Each is checked before the memory is taken.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Objects in the arena.
    pub max_objects: usize,
    /// Memo entries.
    pub max_memo: usize,
    /// Opcodes executed (each pushes at most one index onto the stack or into a container).
    pub max_ops: usize,
}

impl Default for Limits {
    /// A PyTorch checkpoint of a few thousand tensors makes about 15 objects a tensor; these caps
    /// are a hundred times that and keep the reader under about 200 MB whatever the input.
    fn default() -> Self {
        Limits { max_objects: 1 << 20, max_memo: 1 << 20, max_ops: 8 << 20 }
    }
}

/// A parsed pickle: its objects and the one STOP returned.
#[derive(Debug)]
pub struct Pickle {
    pub objects: Vec<Object>,
    pub root: Id,
    /// Bytes of the input the pickle took, up to and including STOP (a file may hold several).
    pub len: usize,
}

/// Stack entries: an object, or MARK.
#[derive(Clone, Copy, PartialEq)]
enum Slot {
    Obj(Id),
    Mark,
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    limits: Limits,
    objects: Vec<Object>,
    stack: Vec<Slot>,
    memo: HashMap<u32, Id>,
    ops: usize,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let left = self.input.len() - self.pos;
        if n > left {
            bail!("the pickle ends inside {what}: {n} bytes wanted at byte {}, {left} left", self.pos);
        }
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1, "an opcode argument")?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n, "an integer")?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    /// A length prefix of `n` bytes, checked against what the input still holds (so nothing is
    /// allocated for a length the input cannot back).
    fn length(&mut self, n: usize) -> Result<usize> {
        let len = self.uint(n)?;
        let left = (self.input.len() - self.pos) as u64;
        if len > left {
            bail!("a length of {len} bytes at byte {}, but only {left} bytes follow", self.pos);
        }
        Ok(len as usize)
    }

    /// Text up to the next newline (protocol 0 arguments), at most 4 KiB.
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.input[self.pos..];
        let Some(end) = rest.iter().take(4096).position(|&b| b == b'\n') else {
            bail!("a text argument at byte {} has no newline within 4096 bytes", self.pos);
        };
        self.pos += end + 1;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| anyhow::anyhow!("a text argument is not UTF-8"))?;
        Ok(s.strip_suffix('\r').unwrap_or(s))
    }

    fn new_object(&mut self, o: Object) -> Result<Id> {
        if self.objects.len() >= self.limits.max_objects {
            bail!("the pickle makes more than {} objects", self.limits.max_objects);
        }
        self.objects.push(o);
        Ok((self.objects.len() - 1) as Id)
    }

    fn push(&mut self, o: Object) -> Result<()> {
        let id = self.new_object(o)?;
        self.stack.push(Slot::Obj(id));
        Ok(())
    }

    fn pop(&mut self) -> Result<Id> {
        match self.stack.pop() {
            Some(Slot::Obj(id)) => Ok(id),
            Some(Slot::Mark) => bail!("an opcode at byte {} found MARK where it wanted an object", self.pos),
            None => bail!("the stack is empty at byte {}", self.pos),
        }
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(Slot::Obj(id)) => Ok(*id),
            _ => bail!("an opcode at byte {} wanted an object on the stack", self.pos),
        }
    }

    /// The objects above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(m) = self.stack.iter().rposition(|s| *s == Slot::Mark) else {
            bail!("an opcode at byte {} wanted a MARK and found none", self.pos);
        };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items.into_iter().map(|s| if let Slot::Obj(id) = s { id } else { unreachable!("marks end at m") }).collect())
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let id = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            bail!("the pickle's memo holds more than {} entries", self.limits.max_memo);
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let id = u32::try_from(key).ok().and_then(|k| self.memo.get(&k)).copied();
        let Some(id) = id else { bail!("the pickle refers to memo entry {key}, which was never stored") };
        self.stack.push(Slot::Obj(id));
        Ok(())
    }

    fn append(&mut self, list: Id, items: Vec<Id>) -> Result<()> {
        match &mut self.objects[list as usize] {
            Object::List(v) => v.extend(items),
            Object::Call { appended, .. } => appended.extend(items),
            other => bail!("APPEND(S) on {}, not a list", kind(other)),
        }
        Ok(())
    }

    fn set_items(&mut self, dict: Id, flat: Vec<Id>) -> Result<()> {
        if !flat.len().is_multiple_of(2) {
            bail!("SETITEMS with an odd number of keys and values");
        }
        let pairs = flat.chunks(2).map(|p| (p[0], p[1]));
        match &mut self.objects[dict as usize] {
            Object::Dict(v) => v.extend(pairs),
            Object::Call { items, .. } => items.extend(pairs),
            other => bail!("SETITEM(S) on {}, not a dict", kind(other)),
        }
        Ok(())
    }

    fn int(&mut self, v: i64) -> Result<()> {
        self.push(Object::Int(v))
    }

    /// LONG1 / LONG4: little-endian two's complement of `n` bytes.
    fn long(&mut self, n: usize) -> Result<()> {
        let b = self.take(n, "a long integer")?;
        if n > 8 {
            return self.push(Object::BigInt(b.to_vec()));
        }
        let mut v: i64 = 0;
        for (i, &x) in b.iter().enumerate() {
            v |= (x as i64) << (8 * i);
        }
        if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
            v -= 1i64 << (8 * n);
        }
        self.int(v)
    }

    fn string(&mut self, n: usize) -> Result<()> {
        let b = self.take(n, "a string")?;
        let s = std::str::from_utf8(b).map_err(|_| anyhow::anyhow!("a string at byte {} is not UTF-8", self.pos))?;
        self.push(Object::Str(s.to_string()))
    }

    fn bytes(&mut self, n: usize) -> Result<()> {
        let b = self.take(n, "bytes")?.to_vec();
        self.push(Object::Bytes(b))
    }

    fn global(&mut self, module: String, name: String) -> Result<Id> {
        if module.len() > 256 || name.len() > 256 {
            bail!("a class name of over 256 bytes");
        }
        self.new_object(Object::Global { module, name })
    }

    fn call(&mut self, callable: Id, args: Id) -> Result<()> {
        self.push(Object::Call { callable, args, items: vec![], appended: vec![], state: None })
    }

    fn run(mut self) -> Result<Pickle> {
        loop {
            self.ops += 1;
            if self.ops > self.limits.max_ops {
                bail!("the pickle runs more than {} opcodes", self.limits.max_ops);
            }
            let at = self.pos;
            let op = self.byte().map_err(|_| anyhow::anyhow!("the pickle ends at byte {at} without STOP"))?;
            if op == b'.' {
                // STOP
                let root = self.pop()?;
                return Ok(Pickle { objects: self.objects, root, len: self.pos });
            }
            self.op(op, at)?;
        }
    }

    /// One opcode (STOP aside), by its group.
    fn op(&mut self, op: u8, at: usize) -> Result<()> {
        match op {
            0x80 | 0x95 | b'(' | b'0' | b'1' | b'2' => self.stack_op(op),
            b'J' | b'K' | b'M' | 0x8a | 0x8b | b'I' | b'L' | b'N' | 0x88 | 0x89 | b'G' | b'F' => self.scalar_op(op),
            b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | 0x96 | b'C' | 0x8e | b'V' | b'S' => self.text_op(op),
            b')' | b't' | 0x85..=0x87 | b']' | 0x8f | b'l' | 0x91 | b'a' | b'e' | 0x90 | b'}' | b'd' | b's' | b'u' => {
                self.container_op(op)
            }
            b'p' | b'q' | b'r' | 0x94 | b'g' | b'h' | b'j' => self.memo_op(op),
            b'c' | 0x93 | b'R' | 0x81 | 0x92 | b'i' | b'o' | b'b' | b'P' | b'Q' => self.object_op(op),
            0x82..=0x84 => {
                bail!("the pickle uses the extension registry (EXT opcodes), which data files never need")
            }
            0x97 | 0x98 => bail!("the pickle uses out-of-band buffers (protocol 5), which files cannot carry"),
            other => bail!("unknown pickle opcode 0x{other:02x} at byte {at}"),
        }
    }

    /// The stack and the framing: PROTO, FRAME, MARK, POP, POP_MARK, DUP.
    fn stack_op(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                let p = self.byte()?;
                if p > 5 {
                    bail!("pickle protocol {p} is newer than 5");
                }
            }
            0x95 => {
                self.uint(8)?; // FRAME: a length hint only
            }
            b'(' => self.stack.push(Slot::Mark),
            b'0' => {
                self.stack.pop().ok_or_else(|| anyhow::anyhow!("POP on an empty stack"))?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.top()?;
                self.stack.push(Slot::Obj(top));
            }
            _ => bail!("opcode 0x{op:02x} is not in this group (an internal error)"),
        }
        Ok(())
    }

    /// Numbers, booleans and None.
    fn scalar_op(&mut self, op: u8) -> Result<()> {
        match op {
            b'J' => {
                let v = self.uint(4)? as u32 as i32;
                self.int(v as i64)?
            }
            b'K' => {
                let v = self.byte()?;
                self.int(v as i64)?
            }
            b'M' => {
                let v = self.uint(2)?;
                self.int(v as i64)?
            }
            0x8a => {
                let n = self.byte()? as usize;
                self.long(n)?
            }
            0x8b => {
                let n = self.length(4)?;
                self.long(n)?
            }
            b'I' | b'L' => {
                let s = self.line()?;
                let s = s.strip_suffix('L').unwrap_or(s);
                match s {
                    "00" => self.push(Object::Bool(false))?,
                    "01" => self.push(Object::Bool(true))?,
                    _ => match s.parse::<i64>() {
                        Ok(v) => self.int(v)?,
                        Err(_) if !s.is_empty() && s.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) => {
                            self.push(Object::BigInt(vec![]))?
                        }
                        Err(_) => bail!("INT/LONG argument '{s}' is not an integer"),
                    },
                }
            }
            b'N' => self.push(Object::None)?,
            0x88 => self.push(Object::Bool(true))?,
            0x89 => self.push(Object::Bool(false))?,
            b'G' => {
                let v = f64::from_bits(u64::from_be_bytes(self.take(8, "a float")?.try_into().expect("8 bytes")));
                self.push(Object::Float(v))?
            }
            b'F' => {
                let s = self.line()?;
                let v = s.parse::<f64>().map_err(|_| anyhow::anyhow!("FLOAT argument '{s}' is not a number"))?;
                self.push(Object::Float(v))?
            }
            _ => bail!("opcode 0x{op:02x} is not in this group (an internal error)"),
        }
        Ok(())
    }

    /// Strings and bytes.
    fn text_op(&mut self, op: u8) -> Result<()> {
        match op {
            // Length-prefixed text: the opcode says the prefix's width and whether it is a string
            // (BINUNICODE, SHORT_BINUNICODE, BINUNICODE8) or bytes (BINSTRING, SHORT_BINSTRING,
            // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8).
            b'X' | 0x8c | 0x8d => {
                let n = self.length(match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                })?;
                self.string(n)?
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                let n = self.length(match op {
                    b'U' | b'C' => 1,
                    b'T' | b'B' => 4,
                    _ => 8,
                })?;
                self.bytes(n)?
            }
            b'V' => {
                // Protocol 0 unicode (raw-unicode-escape): kept as the text it is.
                let s = self.line()?.to_string();
                self.push(Object::Str(s))?
            }
            b'S' => {
                let s = self.line()?;
                let s = s.strip_prefix(['\'', '"']).and_then(|s| s.strip_suffix(['\'', '"'])).unwrap_or(s);
                let s = s.to_string();
                self.push(Object::Str(s))?
            }
            _ => bail!("opcode 0x{op:02x} is not in this group (an internal error)"),
        }
        Ok(())
    }

    /// Tuples, lists and dicts.
    fn container_op(&mut self, op: u8) -> Result<()> {
        match op {
            b')' => self.push(Object::Tuple(vec![]))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push(Object::Tuple(items))?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = vec![0; n];
                for slot in items.iter_mut().rev() {
                    *slot = self.pop()?;
                }
                self.push(Object::Tuple(items))?
            }
            b']' | 0x8f => self.push(Object::List(vec![]))?,
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                self.push(Object::List(items))?
            }
            b'a' => {
                let item = self.pop()?;
                let list = self.top()?;
                self.append(list, vec![item])?
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                let list = self.top()?;
                self.append(list, items)?
            }
            b'}' => self.push(Object::Dict(vec![]))?,
            b'd' => {
                let flat = self.pop_mark()?;
                if !flat.len().is_multiple_of(2) {
                    bail!("DICT with an odd number of keys and values");
                }
                self.push(Object::Dict(flat.chunks(2).map(|p| (p[0], p[1])).collect()))?
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let dict = self.top()?;
                self.set_items(dict, vec![k, v])?
            }
            b'u' => {
                let flat = self.pop_mark()?;
                let dict = self.top()?;
                self.set_items(dict, flat)?
            }
            _ => bail!("opcode 0x{op:02x} is not in this group (an internal error)"),
        }
        Ok(())
    }

    /// The memo: PUT and GET in their three widths.
    fn memo_op(&mut self, op: u8) -> Result<()> {
        match op {
            b'p' => {
                let s = self.line()?;
                let key = s.parse::<u32>().map_err(|_| anyhow::anyhow!("PUT argument '{s}' is not an index"))?;
                self.memo_put(key)?
            }
            b'q' => {
                let key = self.byte()? as u32;
                self.memo_put(key)?
            }
            b'r' => {
                let key = self.uint(4)? as u32;
                self.memo_put(key)?
            }
            0x94 => {
                let key = self.memo.len() as u32;
                self.memo_put(key)?
            }
            b'g' => {
                let s = self.line()?;
                let key = s.parse::<u64>().map_err(|_| anyhow::anyhow!("GET argument '{s}' is not an index"))?;
                self.memo_get(key)?
            }
            b'h' => {
                let key = self.byte()? as u64;
                self.memo_get(key)?
            }
            b'j' => {
                let key = self.uint(4)?;
                self.memo_get(key)?
            }
            _ => bail!("opcode 0x{op:02x} is not in this group (an internal error)"),
        }
        Ok(())
    }

    /// Classes and their instances, as data: GLOBAL, REDUCE, NEWOBJ, INST, OBJ, BUILD, persistent ids.
    fn object_op(&mut self, op: u8) -> Result<()> {
        match op {
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                let id = self.global(module, name)?;
                self.stack.push(Slot::Obj(id));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Object::Str(m), Object::Str(n)) = (&self.objects[module as usize], &self.objects[name as usize])
                else {
                    bail!("STACK_GLOBAL wants two strings");
                };
                let (m, n) = (m.clone(), n.clone());
                let id = self.global(m, n)?;
                self.stack.push(Slot::Obj(id));
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?
            }
            b'i' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                let items = self.pop_mark()?;
                let callable = self.global(module, name)?;
                let args = self.new_object(Object::Tuple(items))?;
                self.call(callable, args)?
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    bail!("OBJ without a class");
                }
                let callable = items.remove(0);
                let args = self.new_object(Object::Tuple(items))?;
                self.call(callable, args)?
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.top()?;
                match &mut self.objects[obj as usize] {
                    Object::Call { state: s, .. } => *s = Some(state),
                    other => bail!("BUILD on {}, which has no state", kind(other)),
                }
            }
            b'P' => {
                let s = self.line()?.to_string();
                let pid = self.new_object(Object::Str(s))?;
                self.push(Object::Persistent(pid))?
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push(Object::Persistent(pid))?
            }
            _ => bail!("opcode 0x{op:02x} is not in this group (an internal error)"),
        }
        Ok(())
    }
}

/// A short name of an object's kind, for messages.
pub fn kind(o: &Object) -> &'static str {
    match o {
        Object::None => "None",
        Object::Bool(_) => "a bool",
        Object::Int(_) | Object::BigInt(_) => "an int",
        Object::Float(_) => "a float",
        Object::Str(_) => "a string",
        Object::Bytes(_) => "bytes",
        Object::Tuple(_) => "a tuple",
        Object::List(_) => "a list",
        Object::Dict(_) => "a dict",
        Object::Global { .. } => "a class",
        Object::Call { .. } => "an object",
        Object::Persistent(_) => "a persistent id",
    }
}

impl Pickle {
    /// Parse one pickle from the start of `input` (which may hold more after its STOP).
    pub fn parse(input: &[u8], limits: Limits) -> Result<Pickle> {
        Machine { input, pos: 0, limits, objects: vec![], stack: vec![], memo: HashMap::new(), ops: 0 }.run()
    }

    pub fn get(&self, id: Id) -> &Object {
        &self.objects[id as usize]
    }

    /// `module.name` when `id` is a class.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.get(id) {
            Object::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The string `id` holds, if it is one.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Object::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The key/value pairs of a dict, or of an object built with dict items (OrderedDict).
    pub fn items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.get(id) {
            Object::Dict(v) => Some(v),
            Object::Call { items, .. } if !items.is_empty() || self.is_ordered_dict(id) => Some(items),
            _ => None,
        }
    }

    fn is_ordered_dict(&self, id: Id) -> bool {
        matches!(self.get(id), Object::Call { callable, .. } if self.global(*callable) == Some(("collections", "OrderedDict")))
    }

    /// The pickle as JSON: dicts become objects (keys that are strings or integers, in pickle
    /// order), lists and tuples arrays, bytes Latin-1 strings, and what only Python could build
    /// (class instances, numpy arrays, persistent ids) null.
    pub fn to_json(&self, walk: &mut Walk) -> Result<serde_json::Value> {
        self.json_of(self.root, walk, 0)
    }

    fn json_of(&self, id: Id, walk: &mut Walk, depth: usize) -> Result<serde_json::Value> {
        use serde_json::Value;
        walk.visit(depth)?;
        Ok(match self.get(id) {
            Object::None | Object::BigInt(_) | Object::Global { .. } | Object::Persistent(_) => Value::Null,
            Object::Bool(b) => Value::Bool(*b),
            Object::Int(i) => Value::from(*i),
            Object::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
            Object::Str(s) => Value::String(s.clone()),
            Object::Bytes(b) => Value::String(b.iter().map(|&c| c as char).collect()),
            Object::Tuple(v) | Object::List(v) => {
                Value::Array(v.iter().map(|&i| self.json_of(i, walk, depth + 1)).collect::<Result<_>>()?)
            }
            Object::Dict(_) | Object::Call { .. } => match self.items(id) {
                Some(items) => {
                    let mut map = serde_json::Map::new();
                    for &(k, v) in items {
                        walk.visit(depth + 1)?;
                        let key = match self.get(k) {
                            Object::Str(s) => s.clone(),
                            Object::Int(i) => i.to_string(),
                            Object::Bytes(b) => b.iter().map(|&c| c as char).collect(),
                            other => bail!("a dict key is {}, not a string or an integer", kind(other)),
                        };
                        map.insert(key, self.json_of(v, walk, depth + 1)?);
                    }
                    Value::Object(map)
                }
                None => Value::Null,
            },
        })
    }
}

/// The bounds of one walk over a pickle's objects: how deep, and how many visits in all. A tree
/// visits each object once; a memo bomb asks for far more visits than the pickle has objects.
pub struct Walk {
    pub max_depth: usize,
    pub visits_left: usize,
}

impl Walk {
    pub fn new(max_depth: usize, max_visits: usize) -> Walk {
        Walk { max_depth, visits_left: max_visits }
    }

    pub fn visit(&mut self, depth: usize) -> Result<()> {
        if depth > self.max_depth {
            bail!("the pickle nests deeper than {} levels", self.max_depth);
        }
        if self.visits_left == 0 {
            bail!("the pickle refers to its objects more often than a data file does (shared many times over: a memo bomb?)");
        }
        self.visits_left -= 1;
        Ok(())
    }
}

/// Read a pickle of plain data (dicts, lists, strings, numbers) as JSON, within `max_visits`
/// objects and 64 levels: the authors' per-image dicts and retrieval lists.
pub fn read_json(bytes: &[u8], max_visits: usize) -> Result<serde_json::Value> {
    let p = Pickle::parse(bytes, Limits::default())?;
    p.to_json(&mut Walk::new(64, max_visits))
}

/// Hostile pickles, as an attacker writes them: for the hostile-input tests (here and in
/// `tests/hostile.rs`), like [`crate::data::image::png_claiming`] for images.
pub mod crafted {
    /// The probe's memo bomb: a list, then 9 levels each a list of 10 memo references to the level
    /// below (222 bytes; 10^9 objects to anyone who copies a memo entry per reference).
    pub fn list_memo_bomb() -> Vec<u8> {
        let mut p = b"\x80\x02]q\x00".to_vec();
        for level in 1..=9u8 {
            p.push(b'(');
            p.extend(std::iter::repeat_n([b'h', level - 1], 10).flatten());
            p.extend([b'l', b'q', level]);
        }
        p.push(b'.');
        p
    }

    /// The same with dicts (keys '0'..'9'), which a state-dict reader walks.
    pub fn dict_memo_bomb() -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00".to_vec();
        for level in 1..=9u8 {
            p.extend(b"}(");
            for k in 0..10u8 {
                p.extend([b'X', 1, 0, 0, 0, b'0' + k, b'h', level - 1]);
            }
            p.extend([b'u', b'q', level]);
        }
        p.push(b'.');
        p
    }

    /// `n` dicts, each the value of key 'a' in the one before.
    pub fn nested_dicts(n: usize) -> Vec<u8> {
        let mut p = b"\x80\x02".to_vec();
        for _ in 0..n {
            p.extend(b"}X\x01\x00\x00\x00a");
        }
        p.push(b'N');
        p.extend(std::iter::repeat_n(b's', n));
        p.push(b'.');
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{'a': [1, 'x', None, True, 2.5], 'b': {'c': -3}}`, protocol 2 as Python writes it.
    const PLAIN: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01X\x01\x00\x00\x00xq\x03N\x88G@\x04\x00\x00\x00\x00\x00\x00eX\x01\x00\x00\x00bq\x04}q\x05X\x01\x00\x00\x00cq\x06J\xfd\xff\xff\xffsu.";

    #[test]
    fn plain_data_reads_as_json_in_order() {
        let v = read_json(PLAIN, 1000).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, "x", null, true, 2.5], "b": {"c": -3}}));
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    /// The memo bomb: a list, then 9 levels each a list of 10 references to the level below. The
    /// reader builds it from a few hundred bytes in a few dozen objects; the walk refuses it after
    /// its budget instead of visiting 10^9 objects.
    #[test]
    fn a_memo_bomb_costs_its_bytes_and_is_refused_by_the_walk() {
        let p = crafted::list_memo_bomb();
        assert!(p.len() < 300, "{} bytes", p.len());
        let parsed = Pickle::parse(&p, Limits::default()).unwrap();
        assert!(parsed.objects.len() < 20, "{} objects", parsed.objects.len());
        let t0 = std::time::Instant::now();
        let e = parsed.to_json(&mut Walk::new(64, 100_000)).unwrap_err().to_string();
        assert!(e.contains("memo bomb"), "{e}");
        assert!(t0.elapsed().as_secs() < 5);
    }

    /// A million nested lists (and a list that contains itself) parse without recursion and are
    /// refused by the walk's depth limit; dropping them is flat.
    #[test]
    fn deep_nesting_and_cycles_are_refused_without_overflowing_the_stack() {
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b'(', 1_000_000));
        p.extend(std::iter::repeat_n(b'l', 1_000_000));
        p.push(b'.');
        let parsed = Pickle::parse(&p, Limits::default()).unwrap();
        let e = parsed.to_json(&mut Walk::new(64, 10_000_000)).unwrap_err().to_string();
        assert!(e.contains("nests deeper than 64"), "{e}");
        drop(parsed);
        // l = []; l.append(l)
        let cyclic = b"\x80\x02]q\x00h\x00a.";
        let parsed = Pickle::parse(cyclic, Limits::default()).unwrap();
        let e = parsed.to_json(&mut Walk::new(64, 10_000)).unwrap_err().to_string();
        assert!(e.contains("nests deeper"), "{e}");
    }

    /// Each length-prefixed text opcode reads its prefix width and makes a string or bytes; a
    /// length past the input's end is refused for each.
    #[test]
    fn length_prefixed_text_opcodes() {
        let limits = Limits { max_objects: 1000, max_memo: 100, max_ops: 5000 };
        let prefix = |width: usize, n: usize| (n as u64).to_le_bytes()[..width].to_vec();
        for (op, width, string) in [
            (b'X', 4, true),
            (0x8c, 1, true),
            (0x8d, 8, true),
            (b'T', 4, false),
            (b'U', 1, false),
            (b'B', 4, false),
            (b'C', 1, false),
            (0x8e, 8, false),
            (0x96, 8, false),
        ] {
            let p = [&b"\x80\x04"[..], &[op], &prefix(width, 3), b"abc."].concat();
            let got = Pickle::parse(&p, limits).unwrap_or_else(|e| panic!("0x{op:02x}: {e}"));
            let want = if string { Object::Str("abc".into()) } else { Object::Bytes(b"abc".to_vec()) };
            assert_eq!(format!("{:?}", got.get(got.root)), format!("{want:?}"), "0x{op:02x}");
            let short = [&b"\x80\x04"[..], &[op], &prefix(width, 9), b"abc."].concat();
            let e = Pickle::parse(&short, limits).unwrap_err().to_string();
            assert!(e.contains("bytes follow"), "0x{op:02x}: {e}");
        }
    }

    /// Every cap holds before its memory is taken: objects, memo entries, opcodes, and lengths
    /// that the input cannot back.
    #[test]
    fn caps_hold_before_allocation() {
        let limits = Limits { max_objects: 1000, max_memo: 100, max_ops: 5000 };
        let mut many = b"\x80\x02".to_vec();
        many.extend(std::iter::repeat_n(b'N', 2000));
        let e = Pickle::parse(&many, limits).unwrap_err().to_string();
        assert!(e.contains("more than 1000 objects"), "{e}");
        let mut memo = b"\x80\x02N".to_vec();
        for i in 0..200u32 {
            memo.push(b'r');
            memo.extend(i.to_le_bytes());
        }
        let e = Pickle::parse(&memo, limits).unwrap_err().to_string();
        assert!(e.contains("memo holds more than 100"), "{e}");
        let mut ops = b"\x80\x02N".to_vec();
        ops.extend(std::iter::repeat_n([b'2', b'0'], 3000).flatten());
        let e = Pickle::parse(&ops, limits).unwrap_err().to_string();
        assert!(e.contains("more than 5000 opcodes"), "{e}");
        // BINUNICODE8 claiming 2^60 bytes, BINBYTES claiming 4 GiB: refused from the length.
        let huge = [&b"\x80\x04\x8d"[..], &(1u64 << 60).to_le_bytes()].concat();
        assert!(Pickle::parse(&huge, limits).unwrap_err().to_string().contains("only 0 bytes follow"));
        let huge = [&b"\x80\x02B"[..], &u32::MAX.to_le_bytes()].concat();
        assert!(Pickle::parse(&huge, limits).unwrap_err().to_string().contains("only 0 bytes follow"));
        for (bad, want) in [
            (&b"\x80\x02"[..], "without STOP"),
            (b"\x80\x02h\x05.", "never stored"),
            (b"\x80\x02(.", "found MARK"),
            (b"\x80\x02\xff", "unknown pickle opcode 0xff"),
            (b"\x80\x09N.", "newer than 5"),
            (b"\x80\x02K\x00K\x01K\x02s.", "on an int, not a dict"),
        ] {
            let e = Pickle::parse(bad, limits).and_then(|p| p.to_json(&mut Walk::new(8, 100))).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    /// Unknown classes stay data: a numpy array (REDUCE then BUILD) becomes null, and nothing
    /// named in the pickle is ever called.
    #[test]
    fn class_instances_are_data() {
        // {'ids': numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b') with BUILD state}
        let p = b"\x80\x02}q\x00X\x03\x00\x00\x00idsq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85q\x04C\x01bq\x05\x87q\x06Rq\x07(K\x01K\x02\x85tq\x08bs.";
        let v = read_json(p, 100).unwrap();
        assert_eq!(v, serde_json::json!({"ids": null}));
        let e = read_json(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.", 100).unwrap();
        assert_eq!(e, serde_json::Value::Null);
    }
}
