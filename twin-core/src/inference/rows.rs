//! Softmax and argmax over the last axis of a classifier's `[N, classes]` output, for batches
//! of rows.
//!
//! tract 0.23.9 runs both row by row when a row is short: its `Softmax` batches rows only when
//! a row's length is a multiple of 4 (the digits model has 10 classes), otherwise each row
//! takes three padded kernel calls (max, exp-and-sum, scale) through a scratch buffer; its
//! `ArgMax` (a `Reduce`) builds an `ndarray` slice for every row. At batch 256 the two cost the
//! digits model more than its matrix products (BENCHMARKS.md, "Inference"). The ops here give
//! the same results with tract-linalg's own exp kernel, run once over the whole buffer:
//! subtract each row's max, exponentiate every value in one call, scale each row by the
//! reciprocal of its sum.
//!
//! [`replace_row_ops`] swaps them into an optimized model for the nodes they cover (float32,
//! last axis, a known non-zero row length) and leaves every other node to tract.

use std::sync::OnceLock;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, Softmax, SoftmaxKind};
use tract_onnx::tract_core::tract_linalg::element_wise::ElementWise;
use tract_onnx::tract_core::tract_linalg::routines::Func;

/// tract-linalg's exp kernel for this host, built once.
fn exp_kernel() -> TractResult<&'static dyn ElementWise<f32>> {
    static KERNEL: OnceLock<Result<Box<dyn ElementWise<f32>>, String>> = OnceLock::new();
    match KERNEL.get_or_init(|| Func::Exp.ew_f32().map_err(|err| format!("{err:#}"))) {
        Ok(kernel) => Ok(kernel.as_ref()),
        Err(err) => bail!("no exp kernel: {err}"),
    }
}

/// Softmax over every `row_len` row of `data`, in place.
fn softmax_rows(data: &mut [f32], row_len: usize) -> TractResult<()> {
    ensure!(
        row_len > 0 && data.len().is_multiple_of(row_len),
        "{} values are not rows of {row_len}",
        data.len()
    );
    for row in data.chunks_exact_mut(row_len) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v -= max);
    }
    exp_kernel()?.run(data)?;
    for row in data.chunks_exact_mut(row_len) {
        let scale = row.iter().sum::<f32>().recip();
        row.iter_mut().for_each(|v| *v *= scale);
    }
    Ok(())
}

/// The index of the largest value of `row`, the first of equal ones (`last` false) or the last
/// (`last` true): tract's `Reducer::ArgMax` rule, including its start from `f32::MIN`, so a row
/// of NaNs gives 0 as it does in tract.
fn argmax(row: &[f32], last: bool) -> i64 {
    let mut best = (0usize, f32::MIN);
    for (index, &value) in row.iter().enumerate() {
        if value > best.1 || (last && value == best.1) {
            best = (index, value);
        }
    }
    best.0 as i64
}

/// Whether the last dimension of `fact` is a known non-zero number.
fn has_known_width(fact: &TypedFact) -> bool {
    fact.shape.last().and_then(|d| d.to_usize().ok()).is_some_and(|n| n > 0)
}

/// Softmax over the last axis of a float32 tensor (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct RowSoftmax;

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let mut output = input.into_tensor();
        let row_len = *output.shape().last().context("softmax of a scalar")?;
        if output.volume() > 0 {
            let mut plain = output.try_as_plain_ram_mut()?;
            softmax_rows(plain.as_slice_mut::<f32>()?, row_len)?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type(), "RowSoftmax takes float32");
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Argmax over the last axis of a float32 tensor, the axis kept with size 1 (as tract's
/// `Reduce` keeps it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct RowArgMax {
    /// Take the last of equal maxima rather than the first.
    last: bool,
}

impl Op for RowArgMax {
    fn name(&self) -> StaticName {
        "RowArgMax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowArgMax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let mut shape: TVec<usize> = input.shape().into();
        let row_len = shape.last_mut().context("argmax of a scalar")?;
        ensure!(*row_len > 0, "argmax over an empty axis");
        let values = input.try_as_plain_ram()?;
        let classes: Vec<i64> = values
            .as_slice::<f32>()?
            .chunks_exact(*row_len)
            .map(|row| argmax(row, self.last))
            .collect();
        *row_len = 1;
        Ok(tvec!(Tensor::from_shape(&shape, &classes)?.into_tvalue()))
    }
}

impl TypedOp for RowArgMax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type(), "RowArgMax takes float32");
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        *shape.last_mut().context("argmax of a scalar")? = 1.to_dim();
        Ok(tvec!(i64::fact(shape)))
    }

    as_op!();
}

/// Replaces tract's `Softmax` and `ArgMax` nodes of `model` by [`RowSoftmax`] and
/// [`RowArgMax`] where they apply: float32 input, over the last axis only, whose length is a
/// known non-zero number.
pub(super) fn replace_row_ops(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes().len() {
        let input = {
            let node = model.node(id);
            let [input] = node.inputs.as_slice() else { continue };
            model.outlet_fact(*input)?.clone()
        };
        if input.datum_type != f32::datum_type() || !has_known_width(&input) {
            continue;
        }
        let last_axis = input.rank() - 1;
        let node = model.node_mut(id);
        let replacement: Option<Box<dyn TypedOp>> = if let Some(softmax) = node.op_as::<Softmax>() {
            (softmax.kind == SoftmaxKind::Softmax
                && softmax.quant_output_dt.is_none()
                && softmax.axes.as_slice() == [last_axis])
            .then(|| Box::new(RowSoftmax) as Box<dyn TypedOp>)
        } else if let Some(reduce) = node.op_as::<Reduce>() {
            match reduce.reducer {
                Reducer::ArgMax(last) if reduce.axes.as_slice() == [last_axis] => {
                    Some(Box::new(RowArgMax { last }) as Box<dyn TypedOp>)
                }
                _ => None,
            }
        } else {
            None
        };
        if let Some(op) = replacement {
            node.op = op;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax the textbook way, in f64.
    fn softmax_f64(row: &[f32]) -> Vec<f64> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    #[test]
    fn softmax_rows_match_the_textbook_over_many_row_lengths() {
        for row_len in [1, 2, 3, 7, 10, 13, 16, 33] {
            let rows = 37;
            let mut data: Vec<f32> = (0..rows * row_len)
                .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
                .collect();
            let expected: Vec<f64> = data.chunks(row_len).flat_map(softmax_f64).collect();
            softmax_rows(&mut data, row_len).expect("softmax");
            for (i, (got, want)) in data.iter().zip(&expected).enumerate() {
                assert!(
                    (f64::from(*got) - want).abs() < 1e-6,
                    "row_len {row_len}, value {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn softmax_refuses_ragged_rows() {
        assert!(softmax_rows(&mut [1.0; 7], 3).is_err());
        assert!(softmax_rows(&mut [1.0; 6], 0).is_err());
    }

    #[test]
    fn argmax_takes_tracts_tie_and_nan_rules() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2], false), 1);
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2], true), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN], false), 0);
        assert_eq!(argmax(&[f32::NAN, 3.0, f32::NAN], false), 1);
        assert_eq!(argmax(&[-5.0, -1.0, -3.0], false), 1);
    }
}
