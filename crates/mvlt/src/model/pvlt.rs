#![allow(non_snake_case)] // `LayerNorm` fields keep the reference (BERT) state-dict names.
//! PVLT: the Pyramid Vision-Language Transformer of MVLT and its heads.
//!
//! Mirrors `PyramidVisionLanguageTransformer` of the authors' code: a PVT-v1 pyramid whose four
//! stages carry the text tokens along with the image patch tokens ([image ; text], no attention
//! mask). Field names and order are the reference's state-dict names and order.

use super::config::{HeadSet, PvltConfig};
use super::layers::{
    bilinear, drop_path, dropout, fused_inference, BatchNorm2d, Conv2d, ConvBn, Embedding, LayerNorm, Linear,
    LinearNorm,
};
use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, FloatDType, Int, Tensor};

/// Stage input: `Conv2d(kernel = stride = patch)` then flatten and LayerNorm.
/// Mirrors the reference's `PatchEmbed` (PVT-v1); MVLT-SPEC 2.2 step 1.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv2d<B>,
    pub norm: LayerNorm<B>,
}

impl<B: Backend> PatchEmbed<B> {
    /// `[B, C_in, H, W] -> ([B, H'*W', C], H', W')`
    pub fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, usize, usize) {
        let (x, h, w) = self.proj.forward_image_tokens(x);
        (self.norm.forward(x), h, w)
    }

    /// The same from the tokens of an `h x w` grid `[B, h*w, C_in]` (the previous stage's output).
    pub fn forward_tokens(&self, x: Tensor<B, 3>, h: usize, w: usize) -> (Tensor<B, 3>, usize, usize) {
        let (x, h, w) = self.proj.forward_tokens(x, h, w);
        (self.norm.forward(x), h, w)
    }
}

/// Spatial-reduction attention over [image ; text] tokens. Queries come from every token; keys and
/// values from the image tokens reduced by a strided conv (+ LayerNorm) followed by the unreduced
/// text tokens. Mirrors the reference's `Attention` (state dict `block{i}.{j}.attn.*`); MVLT-SPEC 2.3.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q: Linear<B>,
    pub kv: Linear<B>,
    pub proj: Linear<B>,
    pub sr: Option<Conv2d<B>>,
    pub norm: Option<LayerNorm<B>>,
    pub num_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// `x`: `[B, H*W + T, C]`, the first `h*w` tokens being the image grid.
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 3> {
        let [b, n, c] = x.dims();
        let heads = self.num_heads;
        let hd = c / heads;
        // `[B, L, C]` -> `[B, heads, L, hd]`. With one head that is a reshape; a swap there would
        // make every later op copy the tensor through a strided view (flex's largest non-matmul
        // cost at stage 1, the only one-head stage).
        let split = |t: Tensor<B, 3>| {
            let l = t.dims()[1];
            match heads {
                1 => t.reshape([b, 1, l, hd]),
                _ => t.reshape([b, l, heads, hd]).swap_dims(1, 2),
            }
        };
        // The inverse: `[B, heads, N, hd]` -> `[B, N, C]`.
        let merge = |t: Tensor<B, 4>| match heads {
            1 => t.reshape([b, n, c]),
            _ => t.swap_dims(1, 2).reshape([b, n, c]),
        };
        let q = split(self.q.forward(x.clone()));

        let kv_src = match (&self.sr, &self.norm) {
            (Some(sr), Some(norm)) => {
                let img = x.clone().slice([0..b, 0..h * w, 0..c]);
                let text = x.slice([0..b, h * w..n, 0..c]);
                let img = norm.forward(sr.forward_tokens(img, h, w).0);
                Tensor::cat(vec![img, text], 1)
            }
            _ => x,
        };
        // kv output channels: [0, C) keys, [C, 2C) values; heads are contiguous channel blocks.
        // Keys and values as two products with the two halves of the kv weight: the same numbers
        // as slicing one [.., 2C] product, without copying each half out of it.
        let (k, v) = self.kv.forward_halves(kv_src);
        let (k, v) = (split(k), split(v));

        let scale = (hd as f64).powf(-0.5);
        if fused_inference(&q) && crate::device::fused_attention_pays::<B>() {
            // libtorch's scaled_dot_product_attention (flash attention on CPU and CUDA): the
            // [L, L_kv] score matrix is never written out.
            let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
            let out = attention(q, k, v, None, None, options);
            return self.proj.forward(merge(out));
        }
        // Softmax in f32 under bf16 training (a no-op cast for f32 models), as autocast does.
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let dtype = scores.dtype();
        let attn = softmax(scores.cast(FloatDType::F32), 3).cast(dtype);
        self.proj.forward(merge(attn.matmul(v)))
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

/// Pre-norm transformer block with stochastic depth on both residual branches.
/// Mirrors the reference's `Block` (`block{i}.{j}.*`); MVLT-SPEC 2.3.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub drop_path: f64,
}

impl<B: Backend> Block<B> {
    pub fn forward(&self, x: Tensor<B, 3>, h: usize, w: usize, train: bool) -> Tensor<B, 3> {
        let x = x.clone() + drop_path(self.attn.forward(self.norm1.forward(x), h, w), self.drop_path, train);
        x.clone() + drop_path(self.mlp.forward(self.norm2.forward(x)), self.drop_path, train)
    }
}

/// BERT embeddings (word + position + token type 0, LayerNorm, dropout), learned from scratch.
/// Mirrors transformers' `BertEmbeddings` (`text_embeddings.*`); MVLT-SPEC 2.1.
#[allow(non_snake_case)]
#[derive(Module, Debug)]
pub struct TextEmbeddings<B: Backend> {
    pub word_embeddings: Embedding<B>,
    pub position_embeddings: Embedding<B>,
    pub token_type_embeddings: Embedding<B>,
    pub LayerNorm: LayerNorm<B>,
    pub dropout: f64,
}

impl<B: Backend> TextEmbeddings<B> {
    /// `[B, T] -> [B, T, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, train: bool) -> Tensor<B, 3> {
        let [_, t] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..t as i64, &device).reshape([1, t]);
        let x = self.word_embeddings.forward(ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(Tensor::zeros([1, t], &device));
        dropout(self.LayerNorm.forward(x), self.dropout, train)
    }
}

/// `dense -> GELU -> LayerNorm` before the tied decoder (BertPredictionHeadTransform).
#[allow(non_snake_case)]
#[derive(Module, Debug)]
pub struct MlmTransform<B: Backend> {
    pub dense: Linear<B>,
    pub LayerNorm: LayerNorm<B>,
}

/// MLM head. The decoder weight is the word-embedding matrix (tied), so only its bias lives here.
/// Mirrors the reference's `mlm_head` (BertLMPredictionHead); MVLT-SPEC 2.4.
#[derive(Module, Debug)]
pub struct MlmHead<B: Backend> {
    pub bias: Param<Tensor<B, 1>>,
    pub transform: MlmTransform<B>,
}

/// ITM / recognition head: `Linear` plus a second, separate bias (the reference adds both).
/// `itm_head`, `sup_cls_head`, `sub_cls_head`; MVLT-SPEC 2.4.
#[derive(Module, Debug)]
pub struct ClsHead<B: Backend> {
    pub linear_bias: Param<Tensor<B, 1>>,
    pub linear: Linear<B>,
}

impl<B: Backend> ClsHead<B> {
    fn new(d: usize, k: usize, std: f64, device: &B::Device) -> Self {
        ClsHead {
            linear_bias: Param::from_tensor(Tensor::zeros([k], device)),
            linear: Linear::new(d, k, true, std, device),
        }
    }
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.linear.forward(x) + self.linear_bias.val().unsqueeze()
    }
}

/// Image-text contrastive (ITC) projections, ours (ALBEF's `vision_proj` / `text_proj` and
/// learned temperature), not in the reference. The image side reads the pooled stage-4 image
/// tokens of a pass with the empty caption, the text side the pooled stage-4 caption tokens of a
/// pass over a blank image ([`Pvlt::embed_images`], [`Pvlt::embed_texts`]): one network, no second
/// encoder. Training them aligns what the image tokens say with what the caption tokens say before
/// the joint pass has to compare them (ALBEF's "align before fuse"), which ITM needs.
#[derive(Module, Debug)]
pub struct ItcHead<B: Backend> {
    /// BatchNorm of the pooled features before each projection (SimCLR's projection head): it
    /// takes out what every image (every caption) shares. Without it, on catalogue images that
    /// are mostly white background, the image embeddings collapse to one point within ten steps
    /// and the loss sits at ln(batch).
    pub image_norm: BatchNorm2d<B>,
    pub text_norm: BatchNorm2d<B>,
    pub image_proj: Linear<B>,
    pub text_proj: Linear<B>,
    /// log(1 / temperature), CLIP's parametrisation; starts at log(1 / 0.07).
    pub logit_scale: Param<Tensor<B, 1>>,
}

impl<B: Backend> ItcHead<B> {
    fn new(d: usize, k: usize, std: f64, device: &B::Device) -> Self {
        ItcHead {
            image_norm: BatchNorm2d::new(d, device),
            text_norm: BatchNorm2d::new(d, device),
            image_proj: Linear::new(d, k, true, std, device),
            text_proj: Linear::new(d, k, true, std, device),
            logit_scale: Param::from_tensor(Tensor::from_floats([(1.0f32 / 0.07).ln()], device)),
        }
    }

    /// `[B, C]` pooled features -> unit-length embeddings `[B, K]`.
    fn embed(norm: &BatchNorm2d<B>, proj: &Linear<B>, x: Tensor<B, 2>, train: bool) -> Tensor<B, 2> {
        let [b, c] = x.dims();
        let x = norm.forward(x.reshape([b, c, 1, 1]), train).reshape([b, c]);
        l2_normalize(proj.forward(x))
    }

    /// The similarity scale exp(logit_scale), capped at 100 as CLIP does.
    pub fn scale(&self) -> Tensor<B, 1> {
        self.logit_scale.val().clamp_max(100f32.ln()).exp()
    }
}

/// Rows scaled to unit length `[N, D]`.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// `nn.Sequential(Conv2d 1x1, Upsample x8)`; the upsampling has no weights.
#[derive(Module, Debug)]
pub struct Score<B: Backend> {
    pub _0: Conv2d<B>,
}

/// Masked image reconstruction head (the reference's `t2i_head`): fuses stage maps 2-4 up to the
/// input resolution. Mirrors the reference's `t2i_head` (`reduction*`, `conv_upsample*`,
/// `conv_concat*`, `conv4`, `score`); MVLT-SPEC 2.4.
#[derive(Module, Debug)]
pub struct T2iHead<B: Backend> {
    pub reduction1: ConvBn<B>,
    pub reduction2: ConvBn<B>,
    pub reduction3: ConvBn<B>,
    pub conv_upsample1: ConvBn<B>,
    pub conv_upsample2: ConvBn<B>,
    pub conv_upsample3: ConvBn<B>,
    pub conv_upsample4: ConvBn<B>,
    pub conv_upsample5: ConvBn<B>,
    pub conv_concat2: ConvBn<B>,
    pub conv_concat3: ConvBn<B>,
    pub conv4: ConvBn<B>,
    pub score: Score<B>,
}

fn upsample<B: Backend>(x: Tensor<B, 4>, factor: usize) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    bilinear(x, h * factor, w * factor, true)
}

impl<B: Backend> T2iHead<B> {
    fn new(dims: [usize; 3], c: usize, device: &B::Device) -> Self {
        let cb = |i, o| ConvBn::new(i, o, device);
        T2iHead {
            reduction1: cb(dims[0], c),
            reduction2: cb(dims[1], c),
            reduction3: cb(dims[2], c),
            conv_upsample1: cb(c, c),
            conv_upsample2: cb(c, c),
            conv_upsample3: cb(c, c),
            conv_upsample4: cb(c, c),
            conv_upsample5: cb(2 * c, 2 * c),
            conv_concat2: cb(2 * c, 2 * c),
            conv_concat3: cb(3 * c, 3 * c),
            conv4: cb(3 * c, 3 * c),
            score: Score { _0: Conv2d::new(3 * c, 3, 1, 1, 0, true, device) },
        }
    }

    /// Stage maps 2, 3, 4 (`[B, C_i, H/8, W/8]`, `/16`, `/32`) -> `[B, 3, H, W]`.
    pub fn forward(&self, f2: Tensor<B, 4>, f3: Tensor<B, 4>, f4: Tensor<B, 4>, train: bool) -> Tensor<B, 4> {
        let r1 = self.reduction1.forward(f2, train);
        let r2 = self.reduction2.forward(f3, train);
        let r3 = self.reduction3.forward(f4, train);
        let x2_1 = self.conv_upsample1.forward(upsample(r3.clone(), 2), train) * r2.clone();
        let x3_1 = self.conv_upsample2.forward(upsample(r2, 2), train)
            * self.conv_upsample3.forward(upsample(x2_1.clone(), 2), train)
            * r1;
        let x2_2 = self
            .conv_concat2
            .forward(Tensor::cat(vec![x2_1, self.conv_upsample4.forward(upsample(r3, 2), train)], 1), train);
        let x3_2 = self
            .conv_concat3
            .forward(Tensor::cat(vec![x3_1, self.conv_upsample5.forward(upsample(x2_2, 2), train)], 1), train);
        let x = self.score._0.forward(self.conv4.forward(x3_2, train));
        upsample(x, 8)
    }
}

/// One of the four stages (MVLT-SPEC 2): the patch embedding of the image and the projection of
/// the text into the stage's width, their positional tables, and the stage's blocks. Saved under
/// the reference's numbered names (`pos_embed{n}`, `patch_embed{n}`, `block{n}.{b}`, ...): the
/// one mapping is `weights::reference_key`, which also keeps the reference's key order.
#[derive(Module, Debug)]
pub struct Stage<B: Backend> {
    pub pos_embed: Param<Tensor<B, 3>>,
    pub text_pos_embed: Param<Tensor<B, 3>>,
    pub patch_embed: PatchEmbed<B>,
    pub text_embed: LinearNorm<B>,
    pub blocks: Vec<Block<B>>,
}

/// The whole model, named as in the reference state dict (the stages through
/// `weights::reference_key`). Mirrors the reference's `PVLT` class; MVLT-SPEC 2 (key list:
/// `fixtures/reference/manifest_*.json`).
#[derive(Module, Debug)]
pub struct Pvlt<B: Backend> {
    /// Stages 1 to 4.
    pub stages: Vec<Stage<B>>,
    pub text_embeddings: TextEmbeddings<B>,
    pub mlm_head_embed: Option<LinearNorm<B>>,
    pub mlm_head: Option<MlmHead<B>>,
    pub itm_head_embed: Option<LinearNorm<B>>,
    pub itm_head: Option<ClsHead<B>>,
    pub sup_cls_head_embed: Option<LinearNorm<B>>,
    pub sup_cls_head: Option<ClsHead<B>>,
    pub sub_cls_head_embed: Option<LinearNorm<B>>,
    pub sub_cls_head: Option<ClsHead<B>>,
    pub t2i_head: Option<T2iHead<B>>,
    pub itc_head: Option<ItcHead<B>>,
    /// Patch size of stage 1 (the smallest image side the model takes is 8 patches).
    pub patch_size: usize,
    /// Grid side of each stage's positional table (56, 28, 14, 7 at img_size 224).
    pub pos_grids: [usize; 4],
}

/// Train or eval: dropout, stochastic depth and BatchNorm batch statistics are on in `Train`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

impl Mode {
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
}

/// Where the MLM head decodes.
#[derive(Clone, Debug)]
pub enum MlmAt<B: Backend> {
    /// Every text position, as the reference does: `mlm_logits` `[B, T, vocab]`.
    AllPositions,
    /// Only these rows of the `B*T` text positions (row-major): `mlm_logits_at` `[M, vocab]`.
    Rows(Tensor<B, 1, Int>),
}

/// What the heads produced (those not asked for are `None`), and the stage-4 text tokens they read.
#[derive(Debug, Clone)]
pub struct PvltOutput<B: Backend> {
    /// Stage-4 text tokens `[B, T, C4]`: what every token head reads.
    pub text_tokens: Tensor<B, 3>,
    /// Stage-4 image map `[B, C4, H4, W4]`.
    pub image_map: Tensor<B, 4>,
    /// `[B, 1, 2]`; softmax(...)[1] is the match probability.
    pub itm_logits: Option<Tensor<B, 3>>,
    /// `[B, T, vocab]` ([`MlmAt::AllPositions`]).
    pub mlm_logits: Option<Tensor<B, 3>>,
    /// `[M, vocab]` at the `M` rows of [`MlmAt::Rows`].
    pub mlm_logits_at: Option<Tensor<B, 2>>,
    pub sup_cls_logits: Option<Tensor<B, 3>>,
    pub sub_cls_logits: Option<Tensor<B, 3>>,
    /// Reconstructed image `[B, 3, H, W]`.
    pub t2i_logits: Option<Tensor<B, 4>>,
}

/// The intermediate tensors the parity checks compare (`mvlt verify`); see
/// [`Pvlt::output_hidden_states`].
#[derive(Debug, Clone)]
pub struct HiddenStates<B: Backend> {
    /// Stage image maps, NCHW.
    pub img_feats: Vec<Tensor<B, 4>>,
    /// Stage text tokens `[B, T, C_i]`.
    pub text_feats: Vec<Tensor<B, 3>>,
    /// BertEmbeddings output `[B, T, hidden]`.
    pub text_embeddings: Tensor<B, 3>,
    /// Stage-1 patch embedding after its LayerNorm `[B, H1*W1, C1]`.
    pub patch_embed1: Tensor<B, 3>,
    /// The (resized) positional embedding added at each stage `[1, Hi*Wi, Ci]`.
    pub pos_embed_used: Vec<Tensor<B, 3>>,
    /// MLM decoder input `[B, T, hidden]` (with [`MlmAt::AllPositions`] and the MLM head).
    pub mlm_hidden: Option<Tensor<B, 3>>,
}

impl<B: Backend> Pvlt<B> {
    /// A freshly initialised model, as the reference's `__init__` + `_init_weights` leave it.
    pub fn new(cfg: &PvltConfig, device: &B::Device) -> Self {
        let d = cfg.embed_dims;
        let th = cfg.token_hidden_size;
        let std = cfg.linear_init_std;
        let trunc =
            |shape: [usize; 3]| Param::from_tensor(Tensor::random(shape, Distribution::Normal(0.0, 0.02), device));
        let grid = |i: usize| cfg.pos_table_grid(i);
        let total_blocks: usize = cfg.depths.iter().sum();
        let mut block_index = 0;
        let stage_blocks = |i: usize| -> Vec<Block<B>> {
            (0..cfg.depths[i])
                .map(|_| {
                    // drop_path rises linearly from 0 to the rate over all blocks (torch.linspace).
                    let rate = if total_blocks > 1 {
                        cfg.drop_path_rate * block_index as f64 / (total_blocks - 1) as f64
                    } else {
                        0.0
                    };
                    block_index += 1;
                    let c = d[i];
                    let sr = cfg.sr_ratios[i];
                    Block {
                        norm1: LayerNorm::new(c, cfg.block_norm_eps, device),
                        attn: Attention {
                            q: Linear::new(c, c, cfg.qkv_bias, std, device),
                            kv: Linear::new(c, 2 * c, cfg.qkv_bias, std, device),
                            proj: Linear::new(c, c, true, std, device),
                            sr: (sr > 1).then(|| Conv2d::new(c, c, sr, sr, 0, true, device)),
                            norm: (sr > 1).then(|| LayerNorm::new(c, cfg.norm_eps, device)),
                            num_heads: cfg.num_heads[i],
                        },
                        norm2: LayerNorm::new(c, cfg.block_norm_eps, device),
                        mlp: Mlp {
                            fc1: Linear::new(c, c * cfg.mlp_ratios[i], true, std, device),
                            fc2: Linear::new(c * cfg.mlp_ratios[i], c, true, std, device),
                        },
                        drop_path: rate,
                    }
                })
                .collect()
        };
        let patch_embed = |i: usize| {
            let (c_in, k) = if i == 0 { (3, cfg.patch_size) } else { (d[i - 1], 2) };
            PatchEmbed {
                proj: Conv2d::new(c_in, d[i], k, k, 0, true, device),
                norm: LayerNorm::new(d[i], cfg.norm_eps, device),
            }
        };
        let text_embed =
            |i: usize| LinearNorm::new(if i == 0 { th } else { d[i - 1] }, d[i], cfg.norm_eps, std, device);
        let head_embed = || LinearNorm::new(d[3], th, cfg.norm_eps, std, device);
        let h = cfg.heads;
        let t = cfg.num_text_tokens;

        let mut word_embeddings = Embedding::new(cfg.vocab_size, th, Some(0), 1.0, device);
        if h.mlm {
            // The reference's init pass re-initialises the tied decoder Linear, i.e. the word
            // embeddings become trunc-normal(0.02) including the [PAD] row.
            word_embeddings.weight =
                Param::from_tensor(Tensor::random([cfg.vocab_size, th], Distribution::Normal(0.0, 0.02), device));
        }
        // Drawn in the reference's order: every stage's blocks, then the positional tables, then
        // the patch and text embeddings (the same initial weights as the flat fields drew).
        let blocks: Vec<Vec<Block<B>>> = (0..4).map(stage_blocks).collect();
        let tables: Vec<_> = (0..4)
            .map(|i| {
                // Stage 4's table has one extra leading slot: PVT's class token position, dropped before use.
                let slots = grid(i) * grid(i) + usize::from(i == 3);
                (trunc([1, slots, d[i]]), trunc([1, t, d[i]]))
            })
            .collect();
        let embeds: Vec<_> = (0..4).map(|i| (patch_embed(i), text_embed(i))).collect();
        let stages = blocks
            .into_iter()
            .zip(tables)
            .zip(embeds)
            .map(|((blocks, (pos_embed, text_pos_embed)), (patch_embed, text_embed))| Stage {
                pos_embed,
                text_pos_embed,
                patch_embed,
                text_embed,
                blocks,
            })
            .collect();
        Pvlt {
            stages,
            text_embeddings: TextEmbeddings {
                word_embeddings,
                position_embeddings: Embedding::new(
                    cfg.max_position_embeddings,
                    th,
                    None,
                    cfg.text_table_init_std,
                    device,
                ),
                token_type_embeddings: Embedding::new(cfg.type_vocab_size, th, None, cfg.text_table_init_std, device),
                LayerNorm: LayerNorm::new(th, cfg.bert_layer_norm_eps, device),
                dropout: cfg.text_dropout,
            },
            mlm_head_embed: h.mlm.then(head_embed),
            mlm_head: h.mlm.then(|| MlmHead {
                bias: Param::from_tensor(Tensor::zeros([cfg.vocab_size], device)),
                transform: MlmTransform {
                    dense: Linear::new(th, th, true, std, device),
                    LayerNorm: LayerNorm::new(th, cfg.norm_eps, device),
                },
            }),
            itm_head_embed: h.itm.then(head_embed),
            itm_head: h.itm.then(|| ClsHead::new(th, 2, std, device)),
            sup_cls_head_embed: h.cls.then(head_embed),
            sup_cls_head: h.cls.then(|| ClsHead::new(th, cfg.num_sup_classes, std, device)),
            sub_cls_head_embed: h.cls.then(head_embed),
            sub_cls_head: h.cls.then(|| ClsHead::new(th, cfg.num_sub_classes, std, device)),
            t2i_head: h.t2i.then(|| T2iHead::new([d[1], d[2], d[3]], cfg.t2i_channel, device)),
            // Drawn last, so that turning ITC on leaves every other initial weight as it was.
            itc_head: h.itc.then(|| ItcHead::new(d[3], cfg.itc_dim, std, device)),
            patch_size: cfg.patch_size,
            pos_grids: [grid(0), grid(1), grid(2), grid(3)],
        }
    }

    /// Heads this model instance has weights for.
    pub fn heads(&self) -> HeadSet {
        HeadSet {
            itm: self.itm_head.is_some(),
            mlm: self.mlm_head.is_some(),
            t2i: self.t2i_head.is_some(),
            cls: self.sup_cls_head.is_some(),
            itc: self.itc_head.is_some(),
        }
    }

    fn stage(&self, i: usize) -> &Stage<B> {
        &self.stages[i]
    }

    /// Stage `i`'s positional table resized to the actual `h x w` grid: bilinear,
    /// align_corners = False, no antialias, and only when the grid differs from the table's own
    /// (the spec's decision on the reference's 3136 shortcut). Stage 4 drops its class slot first.
    pub fn pos_embed_for(&self, i: usize, h: usize, w: usize) -> Tensor<B, 3> {
        let table = self.stage(i).pos_embed.val();
        let [_, n, c] = table.dims();
        let table = if i == 3 { table.slice([0..1, 1..n, 0..c]) } else { table };
        let s = self.pos_grids[i];
        resize_pos_embed(table, s, h, w)
    }

    /// Run the backbone and the requested heads (only those; the MLM decoder alone costs more than
    /// the backbone), the MLM head at every position.
    ///
    /// - `images`: `[B, 3, H, W]` in [0, 1], H and W multiples of patch_size*8.
    /// - `input_ids`: `[B, T]`, T = num_text_tokens.
    pub fn forward(
        &self,
        images: Tensor<B, 4>,
        input_ids: Tensor<B, 2, Int>,
        heads: HeadSet,
        mode: Mode,
    ) -> PvltOutput<B> {
        self.run(images, input_ids, heads, mode, MlmAt::AllPositions, false).0
    }

    /// [`Pvlt::forward`], with the MLM head run only at `rows` (indices into the `B*T` text
    /// positions, row-major); its logits come back as `mlm_logits_at` `[M, vocab]`.
    ///
    /// Why: training predicts about 15% of the word pieces, and the decoder over the whole
    /// vocabulary is the largest matmul of the model (at T = 128 and the bert vocabulary it costs
    /// more than the backbone). The reference decodes every position and ignores the rest in the
    /// loss; decoding only the predicted ones gives the same loss and gradients for far less work.
    pub fn forward_mlm_at(
        &self,
        images: Tensor<B, 4>,
        input_ids: Tensor<B, 2, Int>,
        heads: HeadSet,
        mode: Mode,
        rows: Tensor<B, 1, Int>,
    ) -> PvltOutput<B> {
        self.run(images, input_ids, heads, mode, MlmAt::Rows(rows), false).0
    }

    /// Contrastive image embeddings `[B, itc_dim]`, unit length: the mean of the stage-4 image
    /// tokens of a pass with the empty caption `[CLS] [SEP]` (2 text tokens, so the pass costs
    /// about the image alone). Why not that pass's [CLS]: at initialisation it hardly depends on
    /// the image (README, Training), so every image embeds alike and the contrastive loss has
    /// nothing to pull on. `None` without the ITC head.
    pub fn embed_images(&self, images: Tensor<B, 4>, mode: Mode, cls_id: i64, sep_id: i64) -> Option<Tensor<B, 2>> {
        let head = self.itc_head.as_ref()?;
        let b = images.dims()[0];
        let device = images.device();
        let ids = Tensor::<B, 1, Int>::from_ints([cls_id, sep_id], &device).reshape([1, 2]).repeat_dim(0, b);
        let map = self.run(images, ids, HeadSet::NONE, mode, MlmAt::AllPositions, false).0.image_map;
        let [b, c, h, w] = map.dims();
        let pooled = map.reshape([b, c, h * w]).mean_dim(2).reshape([b, c]);
        Some(ItcHead::embed(&head.image_norm, &head.image_proj, pooled, mode.is_train()))
    }

    /// Contrastive text embeddings `[B, itc_dim]`, unit length: the mean of the stage-4 text
    /// tokens that are not [PAD] (id 0), of a pass of the caption over a blank (black) image of the
    /// smallest side the model takes (8 patches), so the pass costs about the text alone. The mean
    /// rather than [CLS], for the reason [`Pvlt::embed_images`] gives. `None` without the ITC head.
    pub fn embed_texts(&self, input_ids: Tensor<B, 2, Int>, mode: Mode) -> Option<Tensor<B, 2>> {
        let head = self.itc_head.as_ref()?;
        let [b, t] = input_ids.dims();
        let side = self.patch_size * 8;
        let device = input_ids.device();
        let blank = Tensor::<B, 4>::zeros([b, 3, side, side], &device);
        let words = input_ids.clone().not_equal_elem(0).float().reshape([b, t, 1]);
        let text = self.run(blank, input_ids, HeadSet::NONE, mode, MlmAt::AllPositions, false).0.text_tokens;
        let pooled = (text * words.clone()).sum_dim(1).div(words.sum_dim(1).clamp_min(1.0));
        let c = pooled.dims()[2];
        Some(ItcHead::embed(&head.text_norm, &head.text_proj, pooled.reshape([b, c]), mode.is_train()))
    }

    /// [`Pvlt::forward`] and every intermediate tensor the reference fixtures store (candle's
    /// `output_hidden_states`): for `mvlt verify`, never on the training or inference path.
    pub fn output_hidden_states(
        &self,
        images: Tensor<B, 4>,
        input_ids: Tensor<B, 2, Int>,
        heads: HeadSet,
        mode: Mode,
    ) -> (PvltOutput<B>, HiddenStates<B>) {
        let (out, hidden) = self.run(images, input_ids, heads, mode, MlmAt::AllPositions, true);
        (out, hidden.expect("hidden states were asked for"))
    }

    /// The forward pass of MVLT-SPEC 2.1-2.4: text embedding, four stages of [image ; text]
    /// tokens through spatial-reduction blocks, then the heads on the stage-4 text tokens and
    /// stage maps. Keeps the intermediate tensors only when `keep_hidden`.
    fn run(
        &self,
        images: Tensor<B, 4>,
        input_ids: Tensor<B, 2, Int>,
        heads: HeadSet,
        mode: Mode,
        mlm_at: MlmAt<B>,
        keep_hidden: bool,
    ) -> (PvltOutput<B>, Option<HiddenStates<B>>) {
        let train = mode.is_train();
        let text_embeddings = self.text_embeddings.forward(input_ids, train);
        // The stage input (the images), then each stage's image map, NCHW.
        let mut img = images;
        // The previous stage's image tokens and grid: the next patch embedding reads them as
        // tokens, without the copy a conv over the NCHW map would make.
        let mut grid: Option<(Tensor<B, 3>, usize, usize)> = None;
        let mut text = text_embeddings.clone();
        let (mut img_feats, mut text_feats, mut pos_used) = (vec![], vec![], vec![]);
        let mut patch_embed1 = None;
        for i in 0..4 {
            let st = self.stage(i);
            let (x, h, w) = match grid.take() {
                None => st.patch_embed.forward(img.clone()),
                Some((tokens, h, w)) => st.patch_embed.forward_tokens(tokens, h, w),
            };
            if i == 0 && keep_hidden {
                patch_embed1 = Some(x.clone());
            }
            let pos = self.pos_embed_for(i, h, w);
            if keep_hidden {
                pos_used.push(pos.clone());
            }
            let x = x + pos;
            // Texts may be shorter than the table's T (the empty caption of `embed_images`).
            let t = text.dims()[1];
            let y = st.text_embed.forward(text) + st.text_pos_embed.val().slice([0..1, 0..t]);
            let [b, hw, c] = x.dims();
            let mut z = Tensor::cat(vec![x, y], 1);
            for blk in &st.blocks {
                z = blk.forward(z, h, w, train);
            }
            let x = z.clone().slice([0..b, 0..hw, 0..c]);
            text = z.slice([0..b, hw..hw + t, 0..c]);
            img = x.clone().swap_dims(1, 2).reshape([b, c, h, w]);
            grid = Some((x, h, w));
            // The reconstruction head reads stage maps 2-4.
            if i >= 1 || keep_hidden {
                img_feats.push(img.clone());
            }
            if keep_hidden {
                text_feats.push(text.clone());
            }
        }
        let [b, _, c] = text.dims();
        let cls_token = || text.clone().slice([0..b, 0..1, 0..c]);

        let mut out = PvltOutput {
            text_tokens: text.clone(),
            image_map: img.clone(),
            itm_logits: None,
            mlm_logits: None,
            mlm_logits_at: None,
            sup_cls_logits: None,
            sub_cls_logits: None,
            t2i_logits: None,
        };
        let mut mlm_hidden = None;
        if heads.itm {
            if let (Some(e), Some(head)) = (&self.itm_head_embed, &self.itm_head) {
                out.itm_logits = Some(head.forward(e.forward(cls_token())));
            }
        }
        if heads.cls {
            if let (Some(e), Some(head)) = (&self.sup_cls_head_embed, &self.sup_cls_head) {
                out.sup_cls_logits = Some(head.forward(e.forward(cls_token())));
            }
            if let (Some(e), Some(head)) = (&self.sub_cls_head_embed, &self.sub_cls_head) {
                out.sub_cls_logits = Some(head.forward(e.forward(cls_token())));
            }
        }
        if heads.mlm {
            if let (Some(e), Some(head)) = (&self.mlm_head_embed, &self.mlm_head) {
                // Tied decoder: logits = hidden @ word_embeddings^T + bias.
                let words = self.text_embeddings.word_embeddings.weight.val().transpose();
                let bias = head.bias.val();
                let tr = &head.transform;
                match mlm_at {
                    MlmAt::AllPositions => {
                        let hidden = tr.LayerNorm.forward(gelu(tr.dense.forward(e.forward(text.clone()))));
                        out.mlm_logits = Some(burn::tensor::module::linear(hidden.clone(), words, Some(bias)));
                        if keep_hidden {
                            mlm_hidden = Some(hidden);
                        }
                    }
                    MlmAt::Rows(rows) => {
                        let picked = text.clone().reshape([b * text.dims()[1], c]).select(0, rows);
                        let hidden = tr.LayerNorm.forward(gelu(tr.dense.forward(e.forward(picked))));
                        out.mlm_logits_at = Some(burn::tensor::module::linear(hidden, words, Some(bias)));
                    }
                }
            }
        }
        if heads.t2i {
            if let Some(head) = &self.t2i_head {
                // Stage maps 2, 3, 4 are the last three kept.
                let f = &img_feats[img_feats.len() - 3..];
                out.t2i_logits = Some(head.forward(f[0].clone(), f[1].clone(), f[2].clone(), train));
            }
        }
        let hidden = keep_hidden.then(|| HiddenStates {
            img_feats,
            text_feats,
            text_embeddings,
            patch_embed1: patch_embed1.expect("four stages ran"),
            pos_embed_used: pos_used,
            mlm_hidden,
        });
        (out, hidden)
    }
}

/// `[1, s*s, C]` table -> `[1, h*w, C]` (PyTorch `F.interpolate(mode='bilinear', align_corners=False)`).
pub fn resize_pos_embed<B: Backend>(table: Tensor<B, 3>, s: usize, h: usize, w: usize) -> Tensor<B, 3> {
    if (h, w) == (s, s) {
        return table;
    }
    let c = table.dims()[2];
    let grid = table.reshape([1, s, s, c]).permute([0, 3, 1, 2]);
    let resized = bilinear(grid, h, w, false);
    resized.reshape([1, c, h * w]).swap_dims(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use burn::tensor::ElementConversion;

    /// The config's init scales reach the weights: every Linear and the text position/token-type
    /// tables, and nothing else (the word embeddings stay at the reference's 0.02).
    #[test]
    fn init_scales_reach_the_weights() {
        let cfg = PvltConfig { linear_init_std: 0.1, text_table_init_std: 0.05, ..PvltConfig::tiny() };
        let m = Pvlt::<Cpu>::new(&cfg, &Default::default());
        let std = |t: Tensor<Cpu, 2>| -> f32 { t.var(1).mean().sqrt().into_scalar() };
        let b = &m.stages[0].blocks[0];
        for (name, w, want) in [
            ("q", b.attn.q.weight.val(), 0.1),
            ("fc2", b.mlp.fc2.weight.val(), 0.1),
            ("text_embed1", m.stages[0].text_embed._0.weight.val(), 0.1),
            ("position table", m.text_embeddings.position_embeddings.weight.val(), 0.05),
            ("word embeddings", m.text_embeddings.word_embeddings.weight.val(), 0.02),
        ] {
            let got = std(w);
            assert!((got / want as f32 - 1.0).abs() < 0.05, "{name}: std {got}, want {want}");
        }
    }

    /// Without autodiff the forward pass runs the backend's fused attention where it pays
    /// ([`crate::device::fused_attention_pays`]); under autodiff, the ops written out. Same
    /// weights, same numbers, on every CPU backend of the build.
    fn fused_inference_matches_the_written_out_ops<B: Backend>() {
        use burn::module::AutodiffModule;
        type AB<B> = burn::backend::Autodiff<B>;
        let device: B::Device = Default::default();
        B::seed(&device, 3);
        // tiny: one head at stage 1 (the reshape path), 2, 5 and 8 heads after (the swapped one).
        let trained = Pvlt::<AB<B>>::new(&PvltConfig::tiny(), &device);
        let plain: Pvlt<B> = trained.valid();
        let images = Tensor::<B, 4>::random([2, 3, 64, 64], Distribution::Uniform(0.0, 1.0), &device);
        let ids = Tensor::<B, 2, Int>::random([2, 128], Distribution::Uniform(0.0, 30000.0), &device);
        let fused = plain.forward(images.clone(), ids.clone(), HeadSet::ALL, Mode::Eval);
        let ids_ad = Tensor::<AB<B>, 2, Int>::from_data(ids.into_data(), &device);
        let written = trained.forward(Tensor::from_inner(images), ids_ad, HeadSet::ALL, Mode::Eval);
        let err = |a: Tensor<B, 3>, b: Tensor<AB<B>, 3>| -> f32 { (a - b.inner()).abs().max().into_scalar().elem() };
        for (name, e) in [
            ("text tokens", err(fused.text_tokens, written.text_tokens)),
            ("itm logits", err(fused.itm_logits.unwrap(), written.itm_logits.unwrap())),
            ("mlm logits", err(fused.mlm_logits.unwrap(), written.mlm_logits.unwrap())),
            ("main-category logits", err(fused.sup_cls_logits.unwrap(), written.sup_cls_logits.unwrap())),
        ] {
            assert!(e < 1e-4, "{name}: max abs difference {e}");
        }
        let t2i: f32 =
            (fused.t2i_logits.unwrap() - written.t2i_logits.unwrap().inner()).abs().max().into_scalar().elem();
        assert!(t2i < 1e-4, "reconstruction: max abs difference {t2i}");
    }

    #[test]
    fn fused_inference_matches_on_flex() {
        fused_inference_matches_the_written_out_ops::<Cpu>();
    }

    #[cfg(feature = "tch")]
    #[test]
    fn fused_inference_matches_on_libtorch() {
        fused_inference_matches_the_written_out_ops::<crate::device::Torch>();
    }
}
