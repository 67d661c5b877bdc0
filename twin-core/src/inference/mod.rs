//! ONNX models run with tract: the one module that touches tract.
//!
//! A model is loaded from its bytes (the caller reads the file), checked (every operator must
//! be one tract implements; the input must be one float32 matrix `[N, width]` with a symbolic
//! or free batch dimension), optimized once into a plan, and run on batches of rows. The plan
//! is shared (`Arc`), so every device running the same version uses the same plan.

mod rows;

use std::collections::BTreeMap;
use std::sync::Arc;

use thiserror::Error;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// A model could not be loaded or run.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// The bytes are not an ONNX model.
    #[error("not a valid ONNX model: {0}")]
    Decode(String),
    /// The graph uses operators tract does not implement.
    #[error("operator{} not supported by tract: {}", if .0.len() > 1 { "s" } else { "" }, .0.join(", "))]
    Unsupported(Vec<String>),
    /// The model's inputs do not fit what the twin feeds it.
    #[error("{0}")]
    Shape(String),
    /// tract refused the model or a run.
    #[error("tract: {0}")]
    Tract(String),
}

fn tract_error(err: impl std::fmt::Display) -> ModelError {
    // anyhow-style chains print their causes with `{:#}`; keep the message on one line.
    ModelError::Tract(format!("{err:#}").replace('\n', " "))
}

/// One input or output of a model, as declared in the file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Element type (`float32`, `int64`, ...).
    pub element_type: String,
    /// Dimensions: numbers, symbols (`N`) or `?`.
    pub shape: Vec<String>,
}

/// What a model file holds, whether tract can run it and why not.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    /// Producer (`twin scenarios/models/train.py`, `skl2onnx`, ...).
    pub producer: String,
    /// ONNX IR version.
    pub ir_version: i64,
    /// Operator set versions by domain (`""` is the default domain).
    pub opsets: BTreeMap<String, i64>,
    /// Documentation string.
    pub doc: String,
    /// Metadata properties.
    pub metadata: BTreeMap<String, String>,
    /// Inputs (initializers excluded).
    pub inputs: Vec<TensorInfo>,
    /// Outputs.
    pub outputs: Vec<TensorInfo>,
    /// Operators and how many nodes use each, `domain:op` for non-default domains.
    pub operators: BTreeMap<String, usize>,
    /// Whether tract can run it, and if not, why.
    pub runnable: Result<(), String>,
}

fn element_type_name(code: i32) -> String {
    pb::tensor_proto::DataType::try_from(code)
        .map_or_else(|_| format!("type {code}"), |t| format!("{t:?}").to_lowercase())
}

fn tensor_info(value: &pb::ValueInfoProto) -> TensorInfo {
    let mut info = TensorInfo {
        name: value.name.clone(),
        element_type: "?".into(),
        shape: Vec::new(),
    };
    if let Some(pb::type_proto::Value::TensorType(tensor)) = value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        info.element_type = element_type_name(tensor.elem_type);
        if let Some(shape) = &tensor.shape {
            info.shape = shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => p.clone(),
                    _ => "?".into(),
                })
                .collect();
        }
    }
    info
}

fn decode(bytes: &[u8]) -> Result<pb::ModelProto, ModelError> {
    let mut reader = bytes;
    let proto = onnx()
        .proto_model_for_read(&mut reader)
        .map_err(|err| ModelError::Decode(format!("{err:#}")))?;
    if proto.graph.is_none() {
        return Err(ModelError::Decode("the model has no graph".into()));
    }
    Ok(proto)
}

/// Describes a model file without running it.
///
/// # Errors
/// Bytes that are not an ONNX model.
pub fn inspect(bytes: &[u8]) -> Result<ModelInfo, ModelError> {
    let proto = decode(bytes)?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Decode("the model has no graph".into()))?;
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut operators = BTreeMap::new();
    for node in &graph.node {
        let key = if node.domain.is_empty() || node.domain == "ai.onnx" {
            node.op_type.clone()
        } else {
            format!("{}:{}", node.domain, node.op_type)
        };
        *operators.entry(key).or_insert(0) += 1;
    }
    let runnable = CompiledModel::load(bytes).map(|_| ()).map_err(|err| err.to_string());
    Ok(ModelInfo {
        producer: [proto.producer_name.as_str(), proto.producer_version.as_str()]
            .join(" ")
            .trim()
            .to_owned(),
        ir_version: proto.ir_version,
        opsets: proto
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        doc: proto.doc_string.clone(),
        metadata: proto
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
        inputs: graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(tensor_info)
            .collect(),
        outputs: graph.output.iter().map(tensor_info).collect(),
        operators,
        runnable,
    })
}

/// One output of a run: `rows` rows of `width` values each.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// Output name.
    pub name: String,
    /// Values per row (1 for a per-row scalar such as a score or class).
    pub width: usize,
    /// Values, row by row.
    pub values: OutputValues,
}

/// The values of an output.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputValues {
    /// float32 outputs (scores, probabilities).
    F32(Vec<f32>),
    /// int64 outputs (classes).
    I64(Vec<i64>),
}

/// Appends row `row` of every output to `into`, in output order, as float32 (classes
/// converted): the flat row of outputs a device reports and a checker compares. Rows past the
/// end of an output add nothing.
pub fn extend_row_f32(outputs: &[Output], row: usize, into: &mut Vec<f32>) {
    for output in outputs {
        let range = row * output.width..(row + 1) * output.width;
        match &output.values {
            OutputValues::F32(values) => into.extend_from_slice(values.get(range).unwrap_or_default()),
            OutputValues::I64(values) => into.extend(values.get(range).unwrap_or_default().iter().map(|&v| v as f32)),
        }
    }
}

/// The values of a plain tensor, in row-major order.
fn plain_values<T: Datum + Copy>(tensor: &Tensor) -> Result<Vec<T>, ModelError> {
    Ok(tensor
        .to_plain_array_view::<T>()
        .map_err(tract_error)?
        .iter()
        .copied()
        .collect())
}

impl OutputValues {
    /// Makes room for `total` values in all.
    fn reserve_total(&mut self, total: usize) {
        match self {
            Self::F32(values) => values.reserve(total.saturating_sub(values.len())),
            Self::I64(values) => values.reserve(total.saturating_sub(values.len())),
        }
    }

    /// Keeps the first `len` values.
    fn truncate(&mut self, len: usize) {
        match self {
            Self::F32(values) => values.truncate(len),
            Self::I64(values) => values.truncate(len),
        }
    }

    /// Appends the values of a later batch; `Err` when their types differ.
    fn append(&mut self, later: Self) -> Result<(), ()> {
        match (self, later) {
            (Self::F32(values), Self::F32(more)) => values.extend(more),
            (Self::I64(values), Self::I64(more)) => values.extend(more),
            _ => return Err(()),
        }
        Ok(())
    }
}

/// Row counts that have a plan of their own, largest first. tract picks its matrix-product
/// kernels when it optimizes a plan, and with the batch unknown it takes kernels whose tiles
/// span the weights' output width (64 wide for layers of 8 to 32 units): at batch 256 the
/// shipped models ran 1.7x (digits) to 3.6x (vibration-anomaly v2) slower than on a plan
/// compiled for 256 rows, where it picks from the whole shape (BENCHMARKS.md). How
/// [`CompiledModel::run`] splits rows into calls: see there.
///
/// The largest block is also the most rows in one call. Per-row cost stops falling long
/// before, while a whole fleet in one call (100k rows) made every step allocate and fault in
/// tens of megabytes of tensors, which the allocator hands back to the system after each call
/// (its threshold for such blocks is 8 MiB).
pub const BLOCK_ROWS: [usize; 5] = [4096, 1024, 256, 64, 16];

/// One optimized plan and the run states kept for it.
#[derive(Debug)]
struct Plan {
    runnable: Arc<TypedSimplePlan>,
    /// Run states kept between calls: a state holds the plan's value slots and scratch
    /// buffers, and building one per call cost about 30% of a batch-256 call of the small
    /// shipped models (BENCHMARKS.md). A pool rather than one state, so concurrent callers
    /// never wait on each other.
    states: std::sync::Mutex<Vec<TypedSimpleState>>,
}

impl Plan {
    /// Optimizes a decluttered model, with our row ops in place of tract's when
    /// `replace_row_ops`.
    fn new(model: TypedModel, replace_row_ops: bool) -> Result<Self, ModelError> {
        let mut optimized = model.into_optimized().map_err(tract_error)?;
        if replace_row_ops {
            rows::replace_row_ops(&mut optimized).map_err(tract_error)?;
        }
        Ok(Self {
            runnable: optimized.into_runnable().map_err(tract_error)?,
            states: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// One tract call on `rows`, `width` values each, padded with rows of zeros up to
    /// `call_rows` rows.
    fn run(&self, rows: &[f32], width: usize, call_rows: usize) -> Result<TVec<TValue>, ModelError> {
        let input = if rows.len() == call_rows * width {
            Tensor::from_shape(&[call_rows, width], rows)
        } else {
            let mut padded = Vec::with_capacity(call_rows * width);
            padded.extend_from_slice(rows);
            padded.resize(call_rows * width, 0.0);
            Tensor::from_shape(&[call_rows, width], &padded)
        }
        .map_err(tract_error)?;
        let pooled = self.states.lock().ok().and_then(|mut pool| pool.pop());
        let mut state = match pooled {
            Some(state) => state,
            None => TypedSimpleState::new(&self.runnable).map_err(tract_error)?,
        };
        let results = state.run(tvec!(input.into())).map_err(tract_error)?;
        if let Ok(mut pool) = self.states.lock() {
            pool.push(state);
        }
        Ok(results)
    }
}

/// `model` typed and decluttered for an input of `rows` rows of `width` float32 values.
fn decluttered(model: &InferenceModel, rows: TDim, width: usize) -> Result<TypedModel, ModelError> {
    let mut model = model.clone();
    model
        .set_input_fact(0, f32::fact([rows, width.to_dim()]).into())
        .map_err(tract_error)?;
    model
        .into_typed()
        .map_err(tract_error)?
        .into_decluttered()
        .map_err(tract_error)
}

/// One tract call of [`CompiledModel::run`].
struct Call<'a> {
    plan: &'a Plan,
    /// The rows it runs.
    rows: &'a [f32],
    /// Rows in the call: more than `rows` holds when they are padded up to a block.
    call_rows: usize,
}

/// A model optimized into runnable plans for batches of float32 rows.
#[derive(Debug)]
pub struct CompiledModel {
    /// The plan for any number of rows (a symbolic batch).
    any_rows: Plan,
    /// One plan per entry of [`BLOCK_ROWS`], in its order.
    blocks: Vec<Plan>,
    input_name: String,
    width: usize,
    outputs: Vec<TensorInfo>,
    cost: ModelCost,
}

/// The kind of arithmetic a model is made of: device speed-ups differ by family by about 3x
/// (see [`crate::hardware`]), so projections keep one factor per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// Fully connected layers (MatMul, Gemm): multilayer perceptrons, autoencoders.
    #[default]
    Dense,
    /// Standard convolutions.
    Conv,
    /// Depthwise-separable convolutions (grouped Conv).
    Depthwise,
}

impl ModelFamily {
    /// Every family, in order.
    pub const ALL: [ModelFamily; 3] = [ModelFamily::Dense, ModelFamily::Conv, ModelFamily::Depthwise];

    /// The family's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dense => "dense",
            Self::Conv => "conv",
            Self::Depthwise => "depthwise",
        }
    }
}

/// What one row costs, counted on the optimized plan with a batch of one: the basis of
/// hardware projections, identical on every host (no timing involved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelCost {
    /// Multiply-accumulates per row.
    pub macs_per_row: u64,
    /// Parameters (weights and biases).
    pub parameters: u64,
    /// Largest intermediate value count per row (activation memory).
    pub peak_activations: u64,
    /// The family the arithmetic belongs to.
    pub family: ModelFamily,
}

impl ModelCost {
    /// Bytes the model needs resident: float32 parameters plus two activation buffers.
    pub fn memory_bytes(&self) -> u64 {
        4 * (self.parameters + 2 * self.peak_activations)
    }
}

/// Counts the cost of one row: multiply-accumulates and parameters as tract's ops declare them
/// (`TypedOp::cost`) with the batch symbol set to 1, activations from the output facts.
fn model_cost(model: &TypedModel, batch: &Symbol, graph: &pb::GraphProto) -> Result<ModelCost, ModelError> {
    let values = SymbolValues::default().with(batch, 1);
    let mut macs: i64 = 0;
    let mut peak_activations: i64 = 0;
    for node in model.nodes() {
        let inputs = model.node_input_facts(node.id).map_err(tract_error)?;
        // Published figures count the multiply-accumulates of matrix products and
        // convolutions only, so elementwise ops (bias, activations) are left out here too.
        let op = node.op.name();
        if op.contains("EinSum") || op.contains("MatMul") || op.contains("Conv") || op.contains("Gemm") {
            for (kind, count) in node.op.cost(&inputs).map_err(tract_error)? {
                if let tract_onnx::tract_core::ops::Cost::FMA(_) = kind {
                    macs += count.eval(&values).to_i64().unwrap_or(0);
                }
            }
        }
        for fact in &node.outputs {
            let elements = fact.fact.shape.volume().eval(&values).to_i64().unwrap_or(0);
            peak_activations = peak_activations.max(elements);
        }
    }
    let parameters: i64 = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
        .map(|t| t.dims.iter().product::<i64>().max(1))
        .sum();
    let family = if graph
        .node
        .iter()
        .any(|n| n.op_type == "Conv" && n.attribute.iter().any(|a| a.name == "group" && a.i > 1))
    {
        ModelFamily::Depthwise
    } else if graph.node.iter().any(|n| n.op_type == "Conv") {
        ModelFamily::Conv
    } else {
        ModelFamily::Dense
    };
    Ok(ModelCost {
        macs_per_row: macs.max(0) as u64,
        parameters: parameters.max(0) as u64,
        peak_activations: peak_activations.max(0) as u64,
        family,
    })
}

impl CompiledModel {
    /// Loads, checks and optimizes a model.
    ///
    /// # Errors
    /// Undecodable bytes, operators tract does not implement (named), an input that is not a
    /// single `[N, width]` float32 matrix, or tract's own refusal.
    pub fn load(bytes: &[u8]) -> Result<Self, ModelError> {
        Self::load_with(bytes, true)
    }

    /// [`CompiledModel::load`], with tract's own softmax and argmax kept when `replace_row_ops`
    /// is false (the tests compare both).
    fn load_with(bytes: &[u8], replace_row_ops: bool) -> Result<Self, ModelError> {
        let framework = onnx();
        let proto = decode(bytes)?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::Decode("the model has no graph".into()))?;
        let mut unsupported: Vec<String> = graph
            .node
            .iter()
            .filter(|node| !framework.op_register.0.contains_key(&node.op_type))
            .map(|node| {
                let domain = if node.domain.is_empty() {
                    "ai.onnx"
                } else {
                    node.domain.as_str()
                };
                format!("{} ({domain}, node `{}`)", node.op_type, node.name)
            })
            .collect();
        unsupported.dedup();
        if !unsupported.is_empty() {
            return Err(ModelError::Unsupported(unsupported));
        }
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<TensorInfo> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(tensor_info)
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(ModelError::Shape(format!(
                "the model has {} inputs; the twin feeds exactly one [N, width] float32 matrix",
                inputs.len()
            )));
        };
        if input.element_type != "float" {
            return Err(ModelError::Shape(format!(
                "input `{}` is {}, not float32",
                input.name, input.element_type
            )));
        }
        let width = match input.shape.as_slice() {
            [_, width] => width.parse::<usize>().map_err(|_| {
                ModelError::Shape(format!(
                    "input `{}` has shape [{}]: its second dimension must be a number",
                    input.name,
                    input.shape.join(", ")
                ))
            })?,
            other => {
                return Err(ModelError::Shape(format!(
                    "input `{}` has shape [{}]; the twin feeds a [N, width] matrix",
                    input.name,
                    other.join(", ")
                )));
            }
        };
        let outputs: Vec<TensorInfo> = graph.output.iter().map(tensor_info).collect();
        let model = framework.model_for_proto_model(&proto).map_err(tract_error)?;
        let batch = model.symbols.sym("N");
        let any_rows = decluttered(&model, batch.to_dim(), width)?;
        let cost = model_cost(&any_rows, &batch, graph)?;
        let blocks = BLOCK_ROWS
            .iter()
            .map(|&rows| Plan::new(decluttered(&model, rows.to_dim(), width)?, replace_row_ops))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            any_rows: Plan::new(any_rows, replace_row_ops)?,
            blocks,
            input_name: input.name.clone(),
            width,
            outputs,
            cost,
        })
    }

    /// Values per input row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The input's name.
    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    /// The declared outputs.
    pub fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    /// What one row costs (counted, not timed).
    pub fn cost(&self) -> ModelCost {
        self.cost
    }

    /// Runs the model on `rows` (row by row, `width` values each), in tract calls on the plans
    /// of [`BLOCK_ROWS`]. While the rows left fill the largest block, a call takes one. The rows
    /// left then go in one last call on the smallest block that holds them if they fill at
    /// least three quarters of it (padded with rows of zeros, whose outputs are dropped): a
    /// third more arithmetic at most, against up to three calls of each smaller block, and a
    /// call of the small shipped models costs what 20 to 100 rows cost (BENCHMARKS.md).
    /// Otherwise a call takes the largest block they fill, and fewer rows than that (batch 1
    /// included, where tract's matrix-vector kernel is already the right one) run on the plan
    /// for any row count.
    ///
    /// # Errors
    /// A row count that is not a whole number of rows, or a failed run.
    pub fn run(&self, rows: &[f32]) -> Result<Vec<Output>, ModelError> {
        if rows.is_empty() || !rows.len().is_multiple_of(self.width) {
            return Err(ModelError::Shape(format!(
                "{} values are not whole rows of {}",
                rows.len(),
                self.width
            )));
        }
        let mut calls = self.calls(rows);
        let mut outputs = match calls.next() {
            Some(first) => self.run_call(&first)?,
            None => return Ok(Vec::new()),
        };
        // Room for every row's outputs, so that the later calls never regrow them.
        let total_rows = rows.len() / self.width;
        for output in &mut outputs {
            output.values.reserve_total(total_rows * output.width);
        }
        for call in calls {
            for (whole, part) in outputs.iter_mut().zip(self.run_call(&call)?) {
                whole
                    .values
                    .append(part.values)
                    .map_err(|()| ModelError::Tract(format!("output `{}` changed type between calls", whole.name)))?;
            }
        }
        Ok(outputs)
    }

    /// The tract calls that run `rows`, in order, split as [`CompiledModel::run`] says.
    fn calls<'a>(&'a self, rows: &'a [f32]) -> impl Iterator<Item = Call<'a>> + 'a {
        let mut rest = rows;
        std::iter::from_fn(move || {
            let count = rest.len() / self.width;
            if count == 0 {
                return None;
            }
            let blocks = || BLOCK_ROWS.iter().copied().zip(&self.blocks);
            let last = blocks()
                .rev()
                .find(|&(block, _)| count <= block && 4 * count >= 3 * block);
            let (plan, taken, call_rows) = match (last, blocks().find(|&(block, _)| count >= block)) {
                (Some((block, plan)), _) => (plan, count, block),
                (None, Some((block, plan))) => (plan, block, block),
                (None, None) => (&self.any_rows, count, count),
            };
            let (part, after) = rest.split_at(taken * self.width);
            rest = after;
            Some(Call {
                plan,
                rows: part,
                call_rows,
            })
        })
    }

    /// Runs one call; the outputs of its padding rows are dropped.
    fn run_call(&self, call: &Call) -> Result<Vec<Output>, ModelError> {
        let results = call.plan.run(call.rows, self.width, call.call_rows)?;
        let mut outputs = self.outputs_of(results)?;
        let rows = call.rows.len() / self.width;
        for output in &mut outputs {
            output.values.truncate(rows * output.width);
        }
        Ok(outputs)
    }

    /// A call's results as named outputs.
    fn outputs_of(&self, results: TVec<TValue>) -> Result<Vec<Output>, ModelError> {
        let mut outputs = Vec::with_capacity(results.len());
        for (index, value) in results.iter().enumerate() {
            let name = self
                .outputs
                .get(index)
                .map_or_else(|| format!("output{index}"), |o| o.name.clone());
            let shape = value.shape();
            let width = shape.iter().skip(1).product::<usize>().max(1);
            let values = match value.datum_type() {
                DatumType::F32 => OutputValues::F32(plain_values(value)?),
                DatumType::I64 => OutputValues::I64(plain_values(value)?),
                other => {
                    let cast = value
                        .cast_to::<f32>()
                        .map_err(|err| ModelError::Tract(format!("output `{name}` of type {other:?}: {err}")))?;
                    OutputValues::F32(plain_values(&cast)?)
                }
            };
            outputs.push(Output { name, width, values });
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGITS: &[u8] = include_bytes!("../../../scenarios/models/digits-v1.onnx");

    /// The ops of every plan of `model`.
    fn op_names(model: &CompiledModel) -> Vec<String> {
        std::iter::once(&model.any_rows)
            .chain(&model.blocks)
            .flat_map(|plan| plan.runnable.model().nodes().iter().map(|n| n.op.name().to_string()))
            .collect()
    }

    /// Rows of values in [0, 1] (pixels, for the digits model), from a fixed linear congruence.
    fn pseudo_rows(count: usize, width: usize) -> Vec<f32> {
        let mut state: u32 = 12_345;
        (0..count * width)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect()
    }

    /// Rows in each call `run` makes on `count` rows, and the rows each takes.
    fn call_rows(model: &CompiledModel, count: usize) -> Vec<(usize, usize)> {
        let rows = vec![0.0; count * model.width()];
        model
            .calls(&rows)
            .map(|call| (call.call_rows, call.rows.len() / model.width()))
            .collect()
    }

    /// Full blocks while the rows fill the largest; then one padded call when the rest fills
    /// three quarters of a block, else the largest block they fill; the plan for any row count
    /// below the smallest block.
    #[test]
    fn rows_are_split_into_blocks_and_a_last_call() {
        let model = CompiledModel::load(DIGITS).expect("digits");
        assert_eq!(BLOCK_ROWS, [4096, 1024, 256, 64, 16]);
        let cases: [(usize, &[(usize, usize)]); 8] = [
            (1, &[(1, 1)]),
            (11, &[(11, 11)]),
            (12, &[(16, 12)]),
            (256, &[(256, 256)]),
            (300, &[(256, 256), (16, 16), (16, 16), (16, 12)]),
            (1000, &[(1024, 1000)]),
            (4096 + 1, &[(4096, 4096), (1, 1)]),
            (
                5751,
                &[(4096, 4096), (1024, 1024), (256, 256), (256, 256), (64, 64), (64, 55)],
            ),
        ];
        for (count, expected) in cases {
            assert_eq!(call_rows(&model, count), expected, "{count} rows");
        }
    }

    /// Row counts that use every block, padding and the plan for any row count give each row
    /// of every shipped model what that row gives alone (batch 1, on the plan for any row
    /// count): the same classes, and scores and probabilities within float32 rounding (the
    /// kernels differ in how they split a dot product; bit for bit on the digits model).
    /// Padding rows change no other row.
    #[test]
    fn every_block_gives_each_row_what_it_gives_alone() {
        let models: [(&str, &[u8]); 4] = [
            ("digits-v1", DIGITS),
            (
                "vibration-anomaly-v1",
                include_bytes!("../../../scenarios/models/vibration-anomaly-v1.onnx"),
            ),
            (
                "vibration-anomaly-v2",
                include_bytes!("../../../scenarios/models/vibration-anomaly-v2.onnx"),
            ),
            (
                "vibration-anomaly-v3",
                include_bytes!("../../../scenarios/models/vibration-anomaly-v3.onnx"),
            ),
        ];
        for (name, bytes) in models {
            let model = CompiledModel::load(bytes).expect(name);
            let width = model.width();
            let mut worst = 0.0f32;
            let mut differing = 0usize;
            // 5463 = 4096 + 1024 + 256 + 64 + 16 + 7 (any row count); 5468 ends on 12 rows padded to 16.
            for count in [5463, 5468] {
                let rows = pseudo_rows(count, width);
                let together = model.run(&rows).expect("together");
                for (row, values) in rows.chunks(width).enumerate() {
                    let alone = model
                        .outputs_of(model.any_rows.run(values, width, 1).expect("alone"))
                        .expect("outputs");
                    for (all, one) in together.iter().zip(&alone) {
                        let len = match &all.values {
                            OutputValues::F32(values) => values.len(),
                            OutputValues::I64(values) => values.len(),
                        };
                        assert_eq!(len, count * one.width, "{name}: `{}`", one.name);
                        let range = row * one.width..(row + 1) * one.width;
                        match (&all.values, &one.values) {
                            (OutputValues::F32(a), OutputValues::F32(b)) => {
                                for (x, y) in a[range].iter().zip(b) {
                                    let relative = (x - y).abs() / x.abs().max(y.abs()).max(f32::MIN_POSITIVE);
                                    worst = worst.max(relative);
                                    differing += usize::from(x.to_bits() != y.to_bits());
                                }
                            }
                            (OutputValues::I64(a), OutputValues::I64(b)) => {
                                assert_eq!(&a[range], &b[..], "{name}: row {row}");
                            }
                            _ => panic!("{name}: `{}` changed type", one.name),
                        }
                    }
                }
            }
            // Measured: digits and v1 bit for bit; v2 and v3 one unit in the last place on 4 and
            // 7 of 10 931 scores.
            assert!(worst <= 4.0 * f32::EPSILON, "{name}: relative difference {worst:e}");
            if name.starts_with("digits") {
                assert_eq!(differing, 0, "{name}: the digits plans differ in bits");
            }
        }
    }

    /// The row ops are in the digits plan, and give tract's own outputs: the same classes, and
    /// probabilities within float32 rounding.
    #[test]
    fn row_ops_give_tracts_outputs_on_the_digits_model() {
        let ours = CompiledModel::load(DIGITS).expect("digits");
        let tracts = CompiledModel::load_with(DIGITS, false).expect("digits, tract's ops");
        let names = op_names(&ours);
        assert!(names.iter().any(|n| n == "RowSoftmax"), "{names:?}");
        assert!(names.iter().any(|n| n == "RowArgMax"), "{names:?}");
        assert!(!op_names(&tracts).iter().any(|n| n.starts_with("Row")));
        let rows = pseudo_rows(300, 64);
        for batch in [1, 7, 256, 300] {
            let input = &rows[..batch * 64];
            let (a, b) = (ours.run(input).expect("run"), tracts.run(input).expect("run"));
            assert_eq!(a.len(), 2);
            match (&a[0].values, &b[0].values) {
                (OutputValues::F32(x), OutputValues::F32(y)) => {
                    assert_eq!(x.len(), batch * 10);
                    for (p, q) in x.iter().zip(y) {
                        assert!((p - q).abs() < 1e-6, "batch {batch}: {p} vs {q}");
                    }
                }
                other => panic!("probabilities: {other:?}"),
            }
            assert_eq!(a[1], b[1], "batch {batch}: classes differ");
            assert_eq!(a[1].width, 1);
        }
    }
}
