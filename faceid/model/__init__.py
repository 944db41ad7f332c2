"""The identity adapter on Wan2.1-VACE: base components, FaceMapper, LoRA, identity folders, inference.

Modules: ``base_model`` (tiny / real base model components), ``mapper`` (FaceMapper), ``lora`` (peft LoRA,
diffusers file format), ``identity`` (identity folders + cards), ``generate`` (inference core), ``prompts``
(text encoding, once per distinct text), ``compiled`` (``model.compile``), ``memory`` (what sits on the device).
"""
