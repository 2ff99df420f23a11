"""Span, attribute and metric names: OpenTelemetry conventions (lowercase, dot-separated namespaces,
snake_case words, a ``torchcompress.`` prefix, units in UCUM and never in the name).

A Prometheus backend shows ``torchcompress.compression.duration`` (unit ``s``) as
``torchcompress_compression_duration_seconds``, and so on.
"""

SCOPE = "torchcompress"

# spans
SPAN_COMMAND = "torchcompress.command"  # the CLI command (root)
SPAN_RUN = "torchcompress.compress"  # one recipe run
SPAN_STAGE = "torchcompress.stage"  # one stage of it
SPAN_LAYER = "torchcompress.layer"  # one module a stage changed
SPAN_EVAL = "torchcompress.eval"  # perplexity / KL evaluation

# attributes
COMMAND = "torchcompress.command"
RECIPE = "torchcompress.recipe.name"
CALIB_SOURCES = "torchcompress.calibration.sources"
CALIB_SAMPLES = "torchcompress.calibration.samples"
CALIB_SEQ_LEN = "torchcompress.calibration.seq_len"
CALIB_TOKENS = "torchcompress.calibration.tokens"
CALIB_SHA256 = "torchcompress.calibration.sha256"
STAGE = "torchcompress.stage.name"
TECHNIQUE = "torchcompress.technique"  # the stage kind: rtn, gptq, gguf, ...
STAGE_INDEX = "torchcompress.stage.index"
STAGE_COUNT = "torchcompress.stage.count"
MODULE = "torchcompress.module.name"
MODULE_TYPE = "torchcompress.module.type"
MODULE_COUNT = "torchcompress.module.count"
PARAMS = "torchcompress.module.params"
BYTES_BEFORE = "torchcompress.bytes.before"  # tensor bytes before the stage touched it
BYTES_AFTER = "torchcompress.bytes.after"
RATIO = "torchcompress.compression.ratio"
SQNR = "torchcompress.error.sqnr"  # dB, weight SQNR float vs compressed
MSE = "torchcompress.error.mse"
GPTQ_LOSS = "torchcompress.error.gptq_loss"  # trace((W - W_hat) H (W - W_hat)^T) on the calibration data
BITS_PER_WEIGHT = "torchcompress.quant.bits_per_weight"
QUANT = "torchcompress.quant"  # + .bits .group_size .granularity .symmetric .scale_dtype
MODEL = "torchcompress.model.name"
MODEL_STATE = "torchcompress.model.state"  # "uncompressed" | "compressed"
EVAL_TEXT = "torchcompress.eval.text"
EVAL_TOKENS = "torchcompress.eval.tokens"
SCOPE_KIND = "torchcompress.inference.scope"  # "model" | "module"
DEVICE = "torchcompress.device.type"
MEM_HOST_PEAK = "torchcompress.memory.host.peak"  # By: peak resident set size during the stage / run
MEM_DEVICE_PEAK = "torchcompress.memory.device.peak"  # By: peak CUDA memory allocated during the stage

# metrics: (name, unit, description)
M_RATIO = ("torchcompress.compression.ratio", "1", "Model tensor bytes before / after compression")
M_DURATION = ("torchcompress.compression.duration", "s", "Wall time of a compression run")
M_STAGE_DURATION = ("torchcompress.stage.duration", "s", "Wall time of one compression stage")
M_SIZE = ("torchcompress.model.size", "By", "Model tensor bytes (attribute torchcompress.model.state)")
M_LAYER_SQNR = ("torchcompress.layer.sqnr", "dB", "Per-layer weight SQNR, float vs compressed")
M_LAYER_MSE = ("torchcompress.layer.mse", "1", "Per-layer weight mean squared error")
M_LAYER_RATIO = ("torchcompress.layer.compression.ratio", "1", "Per-layer tensor bytes before / after")
M_PPL = ("torchcompress.model.perplexity", "1", "Perplexity on the eval text")
M_PPL_INCREASE = ("torchcompress.model.perplexity.increase", "1",
                  "Perplexity loss vs the uncompressed model: after / before - 1")
M_ACCURACY = ("torchcompress.model.accuracy", "1", "Accuracy (fraction correct)")
M_ACCURACY_DROP = ("torchcompress.model.accuracy.drop", "1", "Accuracy of the uncompressed model minus this one")
M_TOP1 = ("torchcompress.model.top1_agreement", "1", "Fraction of positions with the uncompressed model's argmax")
M_KL = ("torchcompress.model.kl_divergence", "1", "Mean KL(uncompressed || compressed), nats per token")
M_INFER = ("torchcompress.inference.duration", "s", "Forward-pass wall time of a model or module")
M_SPEEDUP = ("torchcompress.inference.speedup", "1", "Mean forward time of the uncompressed / compressed model")

# bucket boundaries (advisory) for the duration histograms
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# forward passes: 50 us .. 10 s, in seconds like every duration
INFER_BUCKETS = (5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
