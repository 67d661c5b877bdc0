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

type Plan = TypedSimplePlan;

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

/// Most rows in one tract call: larger batches are run in parts of this many rows. Per-row
/// cost stops falling long before (batch 256 has all of the batching gain, BENCHMARKS.md),
/// while a whole fleet in one call (100k rows) made every step allocate and fault in tens of
/// megabytes of tensors, which the allocator hands back to the system after each call (its
/// threshold for such blocks is 8 MiB).
pub const MAX_BATCH_ROWS: usize = 4096;

/// A model optimized into a runnable plan for batches of float32 rows.
#[derive(Debug)]
pub struct CompiledModel {
    plan: Arc<Plan>,
    /// Run states kept between calls: a state holds the plan's value slots and scratch
    /// buffers, and building one per call cost about 30% of a batch-256 call of the small
    /// shipped models (BENCHMARKS.md). A pool rather than one state, so concurrent callers
    /// never wait on each other.
    states: std::sync::Mutex<Vec<TypedSimpleState>>,
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
        let mut model = framework.model_for_proto_model(&proto).map_err(tract_error)?;
        let batch = model.symbols.sym("N");
        model
            .set_input_fact(0, f32::fact([batch.to_dim(), width.to_dim()]).into())
            .map_err(tract_error)?;
        let decluttered = model
            .into_typed()
            .map_err(tract_error)?
            .into_decluttered()
            .map_err(tract_error)?;
        let cost = model_cost(&decluttered, &batch, graph)?;
        let mut optimized = decluttered.into_optimized().map_err(tract_error)?;
        if replace_row_ops {
            rows::replace_row_ops(&mut optimized).map_err(tract_error)?;
        }
        let plan = optimized.into_runnable().map_err(tract_error)?;
        Ok(Self {
            plan,
            states: std::sync::Mutex::new(Vec::new()),
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

    /// Runs the model on `rows` (row by row, `width` values each), in batches of at most
    /// [`MAX_BATCH_ROWS`] rows.
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
        let mut parts = rows.chunks(MAX_BATCH_ROWS * self.width);
        let mut outputs = match parts.next() {
            Some(first) => self.run_batch(first)?,
            None => return Ok(Vec::new()),
        };
        // Room for every row's outputs, so that the later parts never regrow them.
        let total_rows = rows.len() / self.width;
        for output in &mut outputs {
            output.values.reserve_total(total_rows * output.width);
        }
        for part in parts {
            for (whole, part) in outputs.iter_mut().zip(self.run_batch(part)?) {
                whole
                    .values
                    .append(part.values)
                    .map_err(|()| ModelError::Tract(format!("output `{}` changed type between batches", whole.name)))?;
            }
        }
        Ok(outputs)
    }

    /// One tract call on whole rows (at most [`MAX_BATCH_ROWS`] of them).
    fn run_batch(&self, rows: &[f32]) -> Result<Vec<Output>, ModelError> {
        let batch = rows.len() / self.width;
        let input = Tensor::from_shape(&[batch, self.width], rows).map_err(tract_error)?;
        let pooled = self.states.lock().ok().and_then(|mut pool| pool.pop());
        let mut state = match pooled {
            Some(state) => state,
            None => TypedSimpleState::new(&self.plan).map_err(tract_error)?,
        };
        let results = state.run(tvec!(input.into())).map_err(tract_error)?;
        if let Ok(mut pool) = self.states.lock() {
            pool.push(state);
        }
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

    fn op_names(model: &CompiledModel) -> Vec<String> {
        model
            .plan
            .model()
            .nodes()
            .iter()
            .map(|n| n.op.name().to_string())
            .collect()
    }

    /// A fleet's worth of rows, run in parts, gives what one call on all of them gives.
    #[test]
    fn rows_beyond_one_batch_give_one_calls_outputs() {
        let model = CompiledModel::load(DIGITS).expect("digits");
        let count = 2 * MAX_BATCH_ROWS + 37;
        let rows: Vec<f32> = (0..count * 64).map(|i| ((i * 7919) % 17) as f32 / 16.0).collect();
        let parts = model.run(&rows).expect("in parts");
        let whole = model.run_batch(&rows).expect("one call");
        assert_eq!(parts.len(), whole.len());
        for (part, one) in parts.iter().zip(&whole) {
            assert_eq!((&part.name, part.width), (&one.name, one.width));
            match (&part.values, &one.values) {
                (OutputValues::F32(a), OutputValues::F32(b)) => {
                    assert_eq!(a.len(), b.len());
                    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                    assert!(worst < 1e-6, "`{}` differs by {worst}", part.name);
                }
                (OutputValues::I64(a), OutputValues::I64(b)) => assert_eq!(a, b, "`{}`", part.name),
                _ => panic!("`{}` changed type", part.name),
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
        // 300 rows of pixels in [0, 1], from a fixed linear congruence.
        let mut state: u32 = 12_345;
        let rows: Vec<f32> = (0..300 * 64)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect();
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
