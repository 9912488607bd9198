//! Gradients of the full pre-training objective through the whole model, against finite
//! differences, on a tiny config (train mode: BatchNorm batch statistics; dropout and drop_path off
//! so the function is deterministic).
use burn::backend::Autodiff;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use mvlt::device::Cpu;
use mvlt::model::weights::{load_state_dict, state_dict, StateDict};
use mvlt::model::{HeadSet, Pvlt, PvltConfig};
use mvlt::train::loss::{losses, Targets};

type B = Autodiff<Cpu>;

fn tiny() -> PvltConfig {
    PvltConfig {
        embed_dims: [8, 16, 16, 16],
        num_heads: [1, 2, 2, 2],
        mlp_ratios: [2, 2, 2, 2],
        depths: [1, 1, 1, 1],
        token_hidden_size: 16,
        num_text_tokens: 6,
        vocab_size: 120,
        num_sup_classes: 5,
        num_sub_classes: 7,
        t2i_channel: 4,
        drop_path_rate: 0.0,
        text_dropout: 0.0,
        img_size: 64,
        ..PvltConfig::tiny()
    }
}

fn loss_of(model: &Pvlt<B>, inputs: &(Tensor<B, 4>, Tensor<B, 2, Int>), t: &Targets<B>) -> Tensor<B, 1> {
    let out = model.forward(inputs.0.clone(), inputs.1.clone(), HeadSet::ALL, true);
    losses(&out, t, HeadSet::ALL).total
}

#[test]
fn analytic_gradients_match_finite_differences() {
    let cfg = tiny();
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 11);
    let model = Pvlt::<B>::new(&cfg, &device);
    let images = Tensor::<B, 4>::random([2, 3, 32, 32], Distribution::Uniform(0.0, 1.0), &device);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![101i64, 7, 8, 9, 102, 0, 101, 30, 31, 102, 0, 0], [2, 6]), &device);
    let t = Targets {
        mlm_labels: Tensor::from_data(TensorData::new(vec![-1i64, 7, -1, 9, -1, -1, -1, -1, 31, -1, -1, -1], [2, 6]), &device),
        itm_labels: Tensor::from_data(TensorData::new(vec![1i64, 0], [2]), &device),
        clean_images: images.clone(),
        sup_labels: Tensor::from_data(TensorData::new(vec![2i64, 4], [2]), &device),
        sub_labels: Tensor::from_data(TensorData::new(vec![6i64, 0], [2]), &device),
    };
    let inputs = (images, ids);
    let grads = loss_of(&model, &inputs, &t).backward();

    // Analytic gradients of a few parameters spread over the network.
    let picks: Vec<(&str, Tensor<Cpu, 1>)> = vec![
        ("itm_head.linear_bias", model.itm_head.as_ref().unwrap().linear_bias.grad(&grads).unwrap()),
        ("block2.0.attn.kv.bias", model.block2[0].attn.kv.bias.as_ref().unwrap().grad(&grads).unwrap()),
        ("text_embed1.0.bias", model.text_embed1._0.bias.as_ref().unwrap().grad(&grads).unwrap()),
        ("t2i_head.score.0.bias", model.t2i_head.as_ref().unwrap().score._0.bias.as_ref().unwrap().grad(&grads).unwrap()),
        ("sub_cls_head.linear.bias", model.sub_cls_head.as_ref().unwrap().linear.bias.as_ref().unwrap().grad(&grads).unwrap()),
    ];
    // The tied word embeddings get one gradient (decoder + lookup): check a row that is looked up.
    let word = model.text_embeddings.word_embeddings.weight.grad(&grads).unwrap();
    let word_row7: Tensor<Cpu, 1> = word.slice([7..8, 0..16]).reshape([16]);

    let sd = state_dict(&model, &cfg).unwrap();
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    let mut check = |key: &str, elem: usize, analytic: f32| {
        let f = |delta: f32| -> f64 {
            let mut tensors = sd.clone();
            for (k, d) in tensors.iter_mut() {
                if k == key {
                    let mut v: Vec<f32> = d.to_vec().unwrap();
                    v[elem] += delta;
                    *d = TensorData::new(v, d.shape.clone());
                }
            }
            let st = StateDict { path: "in-memory".into(), format: "test", tensors: tensors.into_iter().collect(), metadata: Default::default() };
            let (m, _) = load_state_dict(Pvlt::<B>::new(&cfg, &device), &st, true).unwrap();
            loss_of(&m, &inputs, &t).into_scalar() as f64
        };
        let numeric = (f(eps) - f(-eps)) / (2.0 * eps as f64);
        let err = (numeric - analytic as f64).abs() / (numeric.abs().max(analytic.abs() as f64).max(1e-2));
        eprintln!("{key}[{elem}]: analytic {analytic:.6}, finite difference {numeric:.6}, rel err {err:.2e}");
        worst = worst.max(err);
    };
    for (key, g) in &picks {
        let g: Vec<f32> = g.clone().into_data().to_vec().unwrap();
        for elem in [0, g.len() - 1] {
            check(key, elem, g[elem]);
        }
    }
    let w: Vec<f32> = word_row7.into_data().to_vec().unwrap();
    check("text_embeddings.word_embeddings.weight", 7 * 16 + 3, w[3]);
    // f32 central differences with eps 1e-2 are good to about a percent on these smooth functions.
    assert!(worst < 2e-2, "worst relative error {worst:.3e}");
}
