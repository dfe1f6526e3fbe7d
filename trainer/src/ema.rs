//! Exponential moving average of the weights: ema <- decay * ema + (1 - decay) * weights, on the
//! device, matched parameter by parameter through their (name-derived) ids (one fused pass per
//! parameter on the CPU: `ddm_core::update::ema`).

use std::collections::HashMap;

use ddm_core::burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use ddm_core::burn::prelude::*;

/// Collects every float parameter, flattened.
struct Collect(HashMap<ParamId, Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.insert(param.id, param.val().flatten(0, D - 1));
    }
}

struct Blend {
    current: HashMap<ParamId, Tensor<1>>,
    decay: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, ema, mapper) = param.consume();
        let cur = self
            .current
            .remove(&id)
            .expect("the EMA and the model have the same parameters");
        let cur = cur.reshape(ema.dims());
        let new = ddm_core::update::ema(ema, cur, self.decay);
        Param::from_mapped_value(id, new, mapper)
    }
}

/// One EMA step. `model` is the trained model's detached copy (`model.valid()`).
pub fn update<M: Module>(ema: M, model: &M, decay: f64) -> M {
    let mut c = Collect(HashMap::new());
    model.visit(&mut c);
    ema.map(&mut Blend { current: c.0, decay })
}
