"""Helpers shared by the task adapters, one concern per module:

  files.py           reading and checking the files of a real data set
  tokenizers.py      the tokenizers several tasks use (micro word-level, BLIP's BERT, the VL tasks' TextTokenizer)
                     and the check of a tokenizer against the model's embedding
  scenes.py          synthetic scenes of the micro data sets (the micro ADE20K's renderer)
  seg_transforms.py  semantic-segmentation training transforms and normalisation (Segmenter's pipeline)
  seg_inference.py   semantic-segmentation sliding-window and multi-scale + flip inference
  blip_augment.py    BLIP's training transform (RandomResizedCrop + flip + BLIP's RandomAugment) of the VL tasks
  protocol_inputs.py synthetic inputs of the FLOPs protocols (`ids_of_length`: n tokens in the model's [CLS] ...
                     [SEP]; `image_batch`: an image batch of the model's img_size)
  hf_outputs.py      a transformers model's call as the declared bench.api.ModelOutput (the token tasks' forward)

Metric functions are in the top-level `metrics` package."""
