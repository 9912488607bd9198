//! Gradients of the full pre-training objective through the whole model, against finite
//! differences, on a tiny config (train mode: BatchNorm batch statistics; dropout and drop_path off
//! so the function is deterministic).
use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use mvlt::device::Cpu;
use mvlt::model::weights::{load_state_dict, state_dict, StateDict};
use mvlt::model::{HeadSet, Mode, Pvlt, PvltConfig};
use mvlt::train::loss::{losses, MlmTargets, Targets};

mod common;

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
    let out = model.forward_mlm_at(inputs.0.clone(), inputs.1.clone(), HeadSet::ALL, Mode::Train, t.mlm.rows.clone());
    losses(&out, t, HeadSet::ALL).total
}

/// A freshly initialised tiny model (seeded) and two random 32 px images with their captions.
fn model_and_two_pairs(seed: u64) -> (PvltConfig, Pvlt<B>, Tensor<B, 4>, Tensor<B, 2, Int>) {
    let cfg = tiny();
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, seed);
    let model = Pvlt::<B>::new(&cfg, &device);
    let images = Tensor::<B, 4>::random([2, 3, 32, 32], Distribution::Uniform(0.0, 1.0), &device);
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![101i64, 7, 8, 9, 102, 0, 101, 30, 31, 102, 0, 0], [2, 6]),
        &device,
    );
    (cfg, model, images, ids)
}

/// Targets of every loss for [`model_and_two_pairs`]'s inputs.
fn two_pair_targets(images: &Tensor<B, 4>) -> Targets<B> {
    let device = images.device();
    Targets {
        mlm: MlmTargets::from_labels(&[-1, 7, -1, 9, -1, -1, -1, -1, 31, -1, -1, -1], &device),
        itm_labels: Tensor::from_data(TensorData::new(vec![1i64, 0], [2]), &device),
        clean_images: images.clone(),
        sup_labels: Tensor::from_data(TensorData::new(vec![2i64, 4], [2]), &device),
        sub_labels: Tensor::from_data(TensorData::new(vec![6i64, 0], [2]), &device),
        itc: None,
    }
}

#[test]
fn analytic_gradients_match_finite_differences() {
    let _turn = common::backend_turn();
    let (cfg, model, images, ids) = model_and_two_pairs(11);
    let device = model.devices()[0];
    let t = two_pair_targets(&images);
    let inputs = (images, ids);
    let grads = loss_of(&model, &inputs, &t).backward();

    // Analytic gradients of a few parameters spread over the network.
    let picks: Vec<(&str, Tensor<Cpu, 1>)> = vec![
        ("itm_head.linear_bias", model.itm_head.as_ref().unwrap().linear_bias.grad(&grads).unwrap()),
        ("block2.0.attn.kv.bias", model.stages[1].blocks[0].attn.kv.bias.as_ref().unwrap().grad(&grads).unwrap()),
        ("text_embed1.0.bias", model.stages[0].text_embed._0.bias.as_ref().unwrap().grad(&grads).unwrap()),
        (
            "t2i_head.score.0.bias",
            model.t2i_head.as_ref().unwrap().score._0.bias.as_ref().unwrap().grad(&grads).unwrap(),
        ),
        (
            "sub_cls_head.linear.bias",
            model.sub_cls_head.as_ref().unwrap().linear.bias.as_ref().unwrap().grad(&grads).unwrap(),
        ),
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
            let st = StateDict {
                path: "in-memory".into(),
                format: "test",
                tensors: tensors.into_iter().collect(),
                metadata: Default::default(),
            };
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

/// bf16 mixed precision (`precision = "bf16"`): the step runs on an autocast view of the f32 model.
/// Every parameter must still get an f32 gradient, the losses and gradients must stay close to the
/// f32 ones, and BatchNorm's running statistics must stay f32 and be updated in the f32 model.
/// Tolerances, fixed before running: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%
/// per operation), so each loss term within 2% and each gradient tensor's direction within a
/// cosine of 0.98 of the f32 one.
#[test]
fn bf16_autocast_step_tracks_f32() {
    let _turn = common::backend_turn();
    bf16_tracks_f32::<Cpu>();
    // And on libtorch, in builds that have it.
    #[cfg(feature = "tch")]
    bf16_tracks_f32::<mvlt::device::Torch>();
}

fn bf16_tracks_f32<IB: burn::tensor::backend::Backend>() {
    use burn::optim::GradientsParams;
    use burn::tensor::{DType, ElementConversion};
    use mvlt::train::optim::named_grads;
    use mvlt::train::precision::{autocast, Precision};

    let cfg = tiny();
    let device = Default::default();
    <Autodiff<IB> as burn::tensor::backend::Backend>::seed(&device, 5);
    let model = Pvlt::<Autodiff<IB>>::new(&cfg, &device);
    let images = Tensor::<Autodiff<IB>, 4>::random([4, 3, 64, 64], Distribution::Uniform(0.0, 1.0), &device);
    let ids = Tensor::<Autodiff<IB>, 2, Int>::from_data(
        TensorData::new(
            vec![101i64, 7, 8, 9, 102, 0, 101, 30, 31, 102, 0, 0, 101, 5, 6, 102, 0, 0, 101, 40, 41, 42, 43, 102],
            [4, 6],
        ),
        &device,
    );
    let t = Targets {
        mlm: MlmTargets::from_labels(
            &[-1, 7, -1, 9, -1, -1, -1, -1, 31, -1, -1, -1, -1, 5, -1, -1, -1, -1, -1, -1, 41, 42, -1, -1],
            &device,
        ),
        itm_labels: Tensor::from_data(TensorData::new(vec![1i64, 0, 1, 0], [4]), &device),
        clean_images: images.clone(),
        sup_labels: Tensor::from_data(TensorData::new(vec![2i64, 4, 0, 1], [4]), &device),
        sub_labels: Tensor::from_data(TensorData::new(vec![6i64, 0, 3, 3], [4]), &device),
        itc: None,
    };
    let running_mean = || -> Vec<f32> {
        model.t2i_head.as_ref().unwrap().reduction1._1.running_mean.value_sync().into_data().to_vec().unwrap()
    };

    let run = |precision: Precision| {
        let m = autocast(&model, precision);
        let out = m.forward_mlm_at(
            images.clone().cast(precision.dtype()),
            ids.clone(),
            HeadSet::ALL,
            Mode::Train,
            t.mlm.rows.clone(),
        );
        assert_eq!(
            out.itm_logits.as_ref().unwrap().dtype(),
            precision.dtype().into(),
            "the heads run in the step's precision"
        );
        let l = losses(&out, &t, HeadSet::ALL);
        let terms: Vec<f32> =
            [l.mlm, l.itm, l.t2i, l.sup_cls, l.sub_cls].into_iter().map(|x| x.unwrap().into_scalar().elem()).collect();
        assert_eq!(l.total.dtype(), DType::F32, "{precision:?}: the loss must be f32");
        let grads = GradientsParams::from_grads(l.total.backward(), &model);
        (terms, named_grads(&model, &grads))
    };
    let before = running_mean();
    let (loss32, g32) = run(Precision::F32);
    let after32 = running_mean();
    let (loss16, g16) = run(Precision::Bf16);
    let after16 = running_mean();

    for (a, b) in loss32.iter().zip(&loss16) {
        assert!(((a - b) / a).abs() < 2e-2, "loss terms f32 {loss32:?} vs bf16 {loss16:?}");
    }
    assert_eq!(g32.len(), g16.len());
    let mut worst = (1.0f64, String::new());
    for ((name, _, a), (_, _, b)) in g32.iter().zip(&g16) {
        let (a, b) = (
            a.clone().unwrap_or_else(|| panic!("{name}: no f32 gradient")),
            b.clone().unwrap_or_else(|| panic!("{name}: no bf16 gradient")),
        );
        assert_eq!(b.dtype(), DType::F32, "{name}: the master gradient must be f32");
        let dot: f64 = (a.clone() * b.clone()).sum().into_scalar().elem();
        let norms = (a.clone() * a).sum().into_scalar().elem::<f64>().sqrt()
            * (b.clone() * b).sum().into_scalar().elem::<f64>().sqrt();
        if norms > 0.0 && dot / norms < worst.0 {
            worst = (dot / norms, name.clone());
        }
    }
    eprintln!(
        "{}: losses f32 {loss32:?}\nlosses bf16 {loss16:?}\nworst gradient cosine {:.5} ({})",
        std::any::type_name::<IB>(),
        worst.0,
        worst.1
    );
    assert!(worst.0 > 0.98, "gradient of {} points elsewhere in bf16: cosine {:.4}", worst.1, worst.0);
    // BatchNorm buffers: f32, and each pass moved them (the bf16 view shares them with the model).
    assert_eq!(model.t2i_head.as_ref().unwrap().reduction1._1.running_mean.value().dtype(), DType::F32);
    assert_ne!(before, after32);
    assert_ne!(after32, after16);
}

/// The trainer runs the MLM head only at the predicted positions (`forward_mlm_at`). Its loss and
/// every gradient must be those of the reference's way: decode all B*T positions, then a
/// cross-entropy that ignores the unlabelled ones. Also for a batch with no predicted token, where
/// both give a zero MLM loss and zero decoder gradients.
#[test]
fn mlm_on_predicted_positions_equals_the_full_head() {
    use burn::optim::GradientsParams;
    use mvlt::data::text::IGNORE;
    use mvlt::train::loss::cross_entropy;
    use mvlt::train::optim::named_grads;

    let _turn = common::backend_turn();
    let (cfg, model, images, ids) = model_and_two_pairs(3);
    let device = model.devices()[0];
    let heads = HeadSet { mlm: true, ..HeadSet::NONE };
    for labels in [vec![-1i64, 7, -1, 9, -1, -1, -1, -1, 31, -1, -1, -1], vec![IGNORE; 12]] {
        // The reference's way.
        let out = model.forward(images.clone(), ids.clone(), heads, Mode::Eval);
        let full = out.mlm_logits.unwrap().reshape([12, cfg.vocab_size]);
        let want = cross_entropy(full, Tensor::from_data(TensorData::new(labels.clone(), [12]), &device), Some(IGNORE));
        let want_value = want.clone().into_scalar();
        let want_grads = named_grads(&model, &GradientsParams::from_grads(want.backward(), &model));
        // The trainer's way.
        let t = MlmTargets::<B>::from_labels(&labels, &device);
        let out = model.forward_mlm_at(images.clone(), ids.clone(), heads, Mode::Eval, t.rows.clone());
        let got = cross_entropy(out.mlm_logits_at.unwrap(), t.labels, Some(IGNORE));
        let got_value = got.clone().into_scalar();
        let got_grads = named_grads(&model, &GradientsParams::from_grads(got.backward(), &model));

        assert!((got_value - want_value).abs() <= 1e-6 * want_value.abs().max(1.0), "loss {got_value} vs {want_value}");
        assert_eq!(got_grads.len(), want_grads.len());
        let mut present = 0;
        for ((name, _, g), (_, _, w)) in got_grads.iter().zip(&want_grads) {
            assert_eq!(g.is_some(), w.is_some(), "{name}: gradient present in one way only");
            if let (Some(g), Some(w)) = (g, w) {
                present += 1;
                let scale = w.clone().abs().max().into_scalar().max(1e-12);
                let diff = (g.clone() - w.clone()).abs().max().into_scalar();
                // Only the summation order differs: f32 rounding, relative to the tensor's scale.
                assert!(diff <= 1e-5 * scale, "{name}: max abs difference {diff:e} (gradient scale {scale:e})");
            }
        }
        assert!(present > 10, "only {present} gradients compared");
    }
}

/// The tied word embeddings, each use apart (MVLT-SPEC 2.1): the lookup gives the [PAD] row no
/// gradient (`padding_idx` 0), the MLM decoder gives every row one. With the MLM head, row 0's
/// gradient is therefore the decoder's alone and non-zero; with only the ITM head, the lookup is
/// the table's one use and row 0 gets exactly nothing, though PAD positions are looked up.
#[test]
fn pad_row_learns_only_through_the_decoder() {
    use burn::optim::GradientsParams;
    use mvlt::train::optim::named_grads;

    let _turn = common::backend_turn();
    let (cfg, model, images, ids) = model_and_two_pairs(7);
    let t = two_pair_targets(&images);
    let word_grad_rows = |heads: HeadSet| -> (Vec<f32>, Vec<f32>) {
        let out = model.forward_mlm_at(images.clone(), ids.clone(), heads, Mode::Train, t.mlm.rows.clone());
        let grads = GradientsParams::from_grads(losses(&out, &t, heads).total.backward(), &model);
        let (_, _, g) = named_grads(&model, &grads)
            .into_iter()
            .find(|(k, _, _)| k == "text_embeddings.word_embeddings.weight")
            .unwrap();
        let g: Vec<f32> = g.expect("the word embeddings get a gradient").into_data().to_vec().unwrap();
        let h = cfg.token_hidden_size;
        (g[..h].to_vec(), g[7 * h..8 * h].to_vec())
    };
    let (pad, looked_up) = word_grad_rows(HeadSet { itm: true, ..HeadSet::NONE });
    assert!(pad.iter().all(|&x| x == 0.0), "ITM only: the [PAD] row got {pad:?} from the lookup");
    assert!(looked_up.iter().any(|&x| x != 0.0), "ITM only: row 7 is looked up and must get a gradient");
    let (pad, _) = word_grad_rows(HeadSet { itm: true, mlm: true, ..HeadSet::NONE });
    assert!(pad.iter().any(|&x| x != 0.0), "with the MLM head the tied decoder gives the [PAD] row a gradient");
}
