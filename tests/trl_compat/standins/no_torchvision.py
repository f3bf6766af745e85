"""A pytest plugin for checking the stand-ins against TRL itself where torchvision is missing.

transformers 5 builds the processors of Qwen2-VL, Qwen2.5-VL, Qwen3.5 / Qwen3.6 and Gemma 4 with
a video processor, and its video processors need torchvision (`AutoProcessor.from_pretrained`
raises "requires the Torchvision library" for the real repos as for the stand-ins); PyPI's
torchvision wheels are built against CUDA torch and do not load with the CPU torch used here.
TRL's GRPOTrainer loads its processing class with `AutoProcessor.from_pretrained`, so for the TRL
check (README.md, "Checking the stand-ins against TRL itself") this plugin, loaded with
`-p trl_compat.standins.no_torchvision`, makes `AutoVideoProcessor.from_pretrained` return, in
place of the video processor it cannot build, a stand-in that holds the saved config and refuses
to process a video. Images take the PIL image processors as usual; the vision tests pass no
videos. It changes nothing where torchvision is installed, and is not used by grpokit's run
(grpokit builds such processors itself, `grpokit.data.vision.load_processor`).
"""

from __future__ import annotations


def _install() -> None:
    import importlib

    import transformers.processing_utils as processing_utils
    from transformers.utils import is_torchvision_available
    from transformers.video_processing_utils import VideoProcessorMixin

    if is_torchvision_available():
        return
    from .vision_repos import _ConfigOnly

    class VideoProcessorUnavailable(_ConfigOnly, VideoProcessorMixin):
        pass

    # the module itself: `transformers.models.auto` hands out a placeholder for it without torchvision
    auto = importlib.import_module("transformers.models.auto.video_processing_auto").AutoVideoProcessor
    original = auto.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return original(cls, pretrained_model_name_or_path, *args, **kwargs)
        except (ImportError, ValueError) as err:
            if "torchvision" not in str(err).lower():
                raise
            config = {}
            try:
                config, _ = VideoProcessorMixin.get_video_processor_dict(pretrained_model_name_or_path, **kwargs)
            except Exception:  # no saved video processor config: a bare stand-in
                pass
            return VideoProcessorUnavailable(config)

    auto.from_pretrained = classmethod(from_pretrained)
    # ProcessorMixin checks a sub-processor's class by its name on the transformers module, which
    # leaves VideoProcessorMixin out without torchvision
    module = processing_utils.transformers_module
    if not hasattr(module, "VideoProcessorMixin"):
        setattr(module, "VideoProcessorMixin", VideoProcessorMixin)


_install()
