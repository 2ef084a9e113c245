"""The DALI pipeline, defined once with the device as a parameter, and its iterator wrapper.

Graph: three file readers (one per channel, identical order, seed, shuffling and sharding, so that
they stay in step) -> decode to gray (`mixed` on a GPU: PNG is decoded on DALI's CPU threads and
handed on as a GPU tensor; `cpu` without one) -> stack as RGB (yellow, red, blue) -> training: sides
longer than the model input shrunk (antialiased), then one warp_affine doing random resized crop, flips
and rotation; evaluation: one antialiased linear resize -> normalize to NCHW.
With the decoded store (decoded_store.py), one numpy reader of the samples' stored RGB pixels takes the
place of the readers and decoders, with the same order, seed, shuffling and sharding; the rest is the same.

Each reader carries the sample's row position as its label; the wrapper checks that the three
positions agree (a mixed-up sample would be a silent disaster) and maps them to the caller's targets. The
numpy reader has no labels: the wrapper maps the file each sample came from to its position.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.constants import CHANNELS, MIN_TRAIN_BATCH
from dalipipe.data.decoded_store import first_gone
from dalipipe.loading import dali_state
from dalipipe.loading.loader_rules import train_plan

READER = "reader_yellow"
STORE_READER = "reader_store"
# Batches the loader keeps referenced after handing them out. They are views of DALI's own buffers, which
# DALI may reuse once no reference is left, on its own stream, while the training step's kernels queued on
# torch's stream may still read them: the loop queues a step without waiting for it, and CUDA's launch
# queue lets the host run ahead of the GPU by about one efficientnet step. Four covers that with room, for
# four batches of memory (about 150 MB at batch 64, 224 px, float32).
KEEP_HANDED_OUT = 4


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _train_matrix(shape, spec: AugmentSpec):
    """Random resized crop, flips and rotation composed into one source-to-output affine matrix per
    sample, the same composition as augment.sample_affine, so that one warp does all the geometry (one
    pass over the output instead of three; measured faster on the CPU here, and one kernel on a GPU).
    Coordinates: (x, y) with [0, 0] the corner of the first pixel, as torch's align_corners=False.
    shape: each sample's (H, W, C) on the CPU, read from the encoded file: a GPU node's shape() would be a
    GPU-to-CPU transition that makes these CPU operators wait for the same batch's decode on the GPU."""
    from nvidia.dali import fn, types

    s = float(spec.image_size)
    # torchvision's RandomResizedCrop rule (10 attempts, then a centred fallback), on each image's own shape.
    anchor, extent = fn.random_crop_generator(shape, random_area=list(spec.crop_area),
                                              random_aspect_ratio=list(spec.crop_ratio), num_attempts=10)
    anchor, extent = fn.cast(anchor, dtype=types.FLOAT), fn.cast(extent, dtype=types.FLOAT)
    start = fn.stack(anchor[1], anchor[0])  # (y, x) -> (x, y)
    end = start + fn.stack(extent[1], extent[0])
    m = fn.transforms.crop(from_start=start, from_end=end, to_start=[0.0, 0.0], to_end=[s, s])

    def sign(p: float):
        return 1.0 - 2.0 * fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)

    m = fn.transforms.scale(m, scale=fn.stack(sign(spec.hflip_p), sign(spec.vflip_p)), center=[s / 2, s / 2])
    if spec.max_rotation > 0:  # DALI's uniform() rejects an empty range
        angle = fn.random.uniform(range=[-spec.max_rotation, spec.max_rotation])
        m = fn.transforms.rotation(m, angle=angle, center=[s / 2, s / 2])
    return m


def _working_shape(shape, spec: AugmentSpec):
    """AugmentSpec.working_shape in DALI operators: each sample's (height, width) after the shrink, as a FLOAT
    node, and the transform from its pixels to the source's (the identity for images no larger than the
    model input), to put in front of the training matrix.

    Every operator here is named. DALI names the others by a counter in the order they are made, and a
    checkpoint keys each operator's state by its name: operators added with automatic names before the
    existing ones would rename those, and DALI would refuse the loader state of every run saved before
    (an earlier release's included). Named ones leave the counter alone."""
    from nvidia.dali import fn, types

    def xy(hw, name: str):  # (height, width) -> (x, y) order, as transforms take it
        return fn.cat(fn.slice(hw, start=[1], shape=[1], axes=[0], name=f"{name}_x"),
                      fn.slice(hw, start=[0], shape=[1], axes=[0], name=f"{name}_y"), name=name)

    source = fn.cast(fn.slice(shape, start=[0], shape=[2], axes=[0], name="source_hw"), dtype=types.FLOAT,
                     name="source_hw_float")
    largest = fn.constant(fdata=[float(spec.image_size)] * 2, name="largest_working_hw")
    working = fn.reductions.min(fn.stack(source, largest, axis=1, name="source_and_largest"), axes=[1],
                                name="working_hw")
    to_source = fn.transforms.crop(from_start=[0.0, 0.0], from_end=xy(working, "working_xy"),
                                   to_start=[0.0, 0.0], to_end=xy(source, "source_xy"), name="working_to_source")
    return working, to_source


def _process(images, shape, *, spec: AugmentSpec, norm: Normalization, train: bool, shrink: bool, out_dtype,
             layout: str):
    """The processing graph, separate from the readers so that any source of HWC uint8 RGB can use it.
    shape: the images' (H, W, C) as a CPU node (for the random crop). shrink: some image may be larger than
    the model input (without, the training graph is the one before the shrink step, warping the uint8
    images: 64 px images loaded 18% slower on a 2-core CPU through the shrink step's resize to their own
    size, in float)."""
    from nvidia.dali import fn, types

    size = [spec.image_size, spec.image_size]
    if train and not shrink:
        images = fn.warp_affine(images, matrix=_train_matrix(shape, spec), size=size, inverse_map=False,
                                fill_value=0, interp_type=types.INTERP_LINEAR, dtype=types.FLOAT)
    elif train:
        working, to_source = _working_shape(shape, spec)
        # The crop and rotation are drawn on the source's shape, then read from the shrunk image's pixels.
        matrix = fn.transforms.combine(to_source, _train_matrix(shape, spec), name="working_to_output")
        # An image no larger than the model input is resized to its own size here, which returns it exactly.
        images = fn.resize(images, size=working, interp_type=types.INTERP_LINEAR, antialias=True,
                           dtype=types.FLOAT, name="shrink")
        images = fn.warp_affine(images, matrix=matrix, size=size, inverse_map=False, fill_value=0,
                                interp_type=types.INTERP_LINEAR, dtype=types.FLOAT)
    else:
        # Antialiased where a side shrinks, linear where it grows: the working shape's shrink and the
        # resize in one operator (separable per side), equal to augment.shrink then augment.resize.
        images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
    return fn.crop_mirror_normalize(images, mean=list(norm.mean), std=list(norm.std), output_layout=layout,
                                    dtype=out_dtype)


def output_layout(gpu: bool) -> str:
    """HWC on a GPU: viewed as NCHW (a permute, no copy) it is already channels_last, the layout the model
    runs in there. CHW on the CPU, where the model runs contiguous NCHW."""
    return "HWC" if gpu else "CHW"


def decoder_args(decoder: str) -> dict:
    """fn.decoders.image's arguments beyond the output type. mixed: DALI's defaults reserve, per decoder
    thread, 16 MiB of device memory and two 8 MiB pinned host buffers for nvJPEG, which PNG never uses (it
    is decoded on the CPU even by the mixed decoder): 0 allocates on demand instead of holding about 0.75 GB
    of each in three decoders of two pipelines at 8 threads."""
    if decoder != "mixed":
        return {}
    return {"device_memory_padding": 0, "host_memory_padding": 0}


def build_pipeline(paths: list[list[str]], *, spec: AugmentSpec, norm: Normalization, train: bool,
                   device_id: int | None, settings: LoaderSettings, checkpoint: bytes | None = None,
                   largest_side: int | None = None, stored: list[str] | None = None):
    """device_id None: every operator on the CPU; a GPU number: decoding as settings.decoder says, the
    processing on that GPU. checkpoint: a state saved from the same pipeline (readers' positions, random
    generators), to continue where it was. largest_side: the longest side of any image (the data check's),
    None if unknown. stored: each sample's file in the decoded store, read instead of its PNGs."""
    if checkpoint is not None:  # saved before the graph changed? fit it to the graph as it is now
        fresh = define_pipeline(paths, spec=spec, norm=norm, train=train, device_id=device_id, settings=settings,
                                largest_side=largest_side, stored=stored)
        fresh.build()
        checkpoint = dali_state.fit(checkpoint, fresh.checkpoint())
        del fresh
    p = define_pipeline(paths, spec=spec, norm=norm, train=train, device_id=device_id, settings=settings,
                        checkpoint=checkpoint, largest_side=largest_side, stored=stored)
    p.build()
    return p


def define_pipeline(paths: list[list[str]], *, spec: AugmentSpec, norm: Normalization, train: bool,
                    device_id: int | None, settings: LoaderSettings, checkpoint: bytes | None = None,
                    largest_side: int | None = None, stored: list[str] | None = None):
    """build_pipeline's pipeline, not yet built: building a GPU pipeline needs the GPU, its definition
    does not (the tests read a GPU pipeline's graph on machines without one)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    seed, shard_id = settings.seed, settings.shard_id
    order = (np.random.default_rng(seed).permutation(len(paths)) if train else np.arange(len(paths))).tolist()
    decode_on = "mixed" if gpu and settings.decoder == "mixed" and stored is None else "cpu"
    dec_args = decoder_args(decode_on)
    # Same arguments on every reader keep the three channel readers in step, and the store's reader in the
    # same order as they are (the Loader base of both shuffles alike): shuffle_after_epoch is a full
    # permutation per epoch (random_shuffle only shuffles inside a buffer), and the list is pre-permuted so
    # that the first epoch is shuffled too. pad_last_batch stops the last partial batch from spilling into
    # the next epoch.
    reading = dict(shuffle_after_epoch=train, random_shuffle=False, seed=seed, shard_id=shard_id,
                   num_shards=settings.num_shards, pad_last_batch=True)
    shrink = largest_side is None or spec.working_shape(largest_side, largest_side) != (largest_side, largest_side)

    @pipeline_def(batch_size=settings.batch_size, num_threads=max(1, settings.workers or 1), device_id=device_id,
                  seed=seed + shard_id, prefetch_queue_depth=2, exec_dynamic=True,
                  enable_checkpointing=settings.checkpointing, checkpoint=checkpoint)
    def pipe():
        if stored is not None:
            rgb = fn.readers.numpy(files=[stored[i] for i in order], **reading, name=STORE_READER)
            shape = rgb.shape()
            rgb = fn.reshape(rgb, layout="HWC", name="store_hwc")
            # the file each sample came from, as bytes padded with zeros to the batch's longest name
            labels = [fn.pad(fn.get_property(rgb, key="source_info", name="store_source"), fill_value=0,
                             name="store_source_padded")]
        else:
            outs, labels = [], []
            for k, channel in enumerate(CHANNELS):
                enc, pos = fn.readers.file(files=[paths[i][k] for i in order], labels=order, **reading,
                                           name=f"reader_{channel}")
                if k == 0:  # the three channels share one size (checked with the data)
                    shape = fn.peek_image_shape(enc)
                outs.append(fn.decoders.image(enc, device=decode_on, output_type=types.GRAY, **dec_args))
                labels.append(pos)
            rgb = fn.cat(*outs, axis=2)
        if gpu and decode_on == "cpu":
            rgb = rgb.gpu()  # one host-to-device copy of the stacked batch
        out_dtype = types.FLOAT16 if settings.out_dtype == "float16" else types.FLOAT
        return (_process(rgb, shape, spec=spec, norm=norm, train=train, shrink=shrink, out_dtype=out_dtype,
                         layout=output_layout(gpu)), *labels)

    return pipe()


class DaliLoader:
    """DALI pipeline + DALIGenericIterator as an iterable of (images, targets) with len()."""

    def __init__(self, paths, targets, *, spec: AugmentSpec, norm: Normalization, train: bool, device: torch.device,
                 settings: LoaderSettings, state: dict | None = None, largest_side: int | None = None,
                 stored: list[str] | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from dalipipe.device import cuda_index

        self.pipe = build_pipeline(paths, spec=spec, norm=norm, train=train, device_id=cuda_index(device),
                                   settings=settings, checkpoint=state["dali"] if state else None,
                                   largest_side=largest_side, stored=stored)
        self.checkpointing = settings.checkpointing
        # The store's reader names each sample's file, mapped back to its position here.
        self.position_of = None if stored is None else {f: i for i, f in enumerate(stored)}
        outputs, reader = (["images", "p0", "p1", "p2"], READER) if stored is None else (["images", "file"],
                                                                                           STORE_READER)
        self.iterator = DALIGenericIterator(self.pipe, outputs, reader_name=reader,
                                            last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        self.targets = torch.tensor(np.asarray(targets), dtype=torch.int64)
        self.device, self.out_dtype = device, getattr(torch, settings.out_dtype)
        self.hwc = output_layout(device.type == "cuda") == "HWC"
        # Training: the same samples and steps on every rank (loader_rules.train_plan); evaluation: everything.
        self.plan = train_plan(len(paths), settings.batch_size, settings.num_shards) if train else None
        # Samples of this epoch's plan not yet handed out; restored with the DALI state mid-epoch.
        self.left = state["left"] if state else None
        # The last batches handed out, across epochs' ends too (DALI prefetches the next epoch at once).
        self.handed_out: collections.deque = collections.deque(maxlen=KEEP_HANDED_OUT)

    def __len__(self) -> int:
        return self.plan[1] if self.plan else len(self.iterator)

    def state(self) -> dict:
        """Where the loader is: DALI's own checkpoint (readers, random generators, iterator counters,
        prefetched batches accounted for) and this wrapper's count of the epoch's samples still due."""
        if not self.checkpointing:
            raise RuntimeError("DaliLoader.state() needs LoaderSettings(checkpointing=True)")
        return {"dali": self.iterator.checkpoints()[0], "left": self.left}

    def __iter__(self):
        if self.left is None and self.plan:
            self.left = self.plan[0]
        left_in_plan = self.plan is not None
        for batch in self._batches():  # always to the end: DALI's iterator resets only there
            self.handed_out.append(batch)
            pos = self._positions(batch)
            images = batch["images"]
            if left_in_plan:
                keep = min(len(pos), self.left)
                self.left -= keep
                if keep < MIN_TRAIN_BATCH:
                    continue
                images, pos = images[:keep], pos[:keep]
            if self.hwc:
                images = images.permute(0, 3, 1, 2)  # NCHW view, channels_last in memory
            with torch.profiler.record_function("h2d_copy"):  # a no-op on a GPU: DALI's output is there
                images = images.to(self.device, non_blocking=True)
            if images.dtype != self.out_dtype:
                images = images.to(self.out_dtype)
            yield images, self.targets[pos].to(self.device, non_blocking=True)
        self.left = None  # the next epoch starts with its whole plan

    def _batches(self):
        """The iterator's batches; a store file gone since the check (the pipeline fails on it) as one line."""
        batches = iter(self.iterator)
        while True:
            try:
                (batch,) = next(batches)
            except StopIteration:
                return
            except RuntimeError:
                gone = first_gone(self.position_of) if self.position_of is not None else None
                if gone is not None:
                    raise gone from None
                raise
            yield batch

    def _positions(self, batch) -> torch.Tensor:
        """The batch's samples as row positions (CPU int64), from the channel readers' labels, or from the
        names of the store's files."""
        if self.position_of is not None:
            names = batch["file"].cpu().numpy()
            return torch.tensor([self.position_of[bytes(n).rstrip(b"\0").decode()] for n in names],
                                dtype=torch.int64)
        pos = [batch[k].view(-1).long().cpu() for k in ("p0", "p1", "p2")]
        if not (torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])):
            raise RuntimeError("DALI channel readers fell out of step; please report this as a bug")
        return pos[0]

    def close(self) -> None:
        self.handed_out.clear()
        del self.iterator, self.pipe
