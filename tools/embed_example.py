"""Embedding the runtime in an app: fine-tune a bundle on the app's own text and export a PEFT adapter.

    python tools/embed_example.py out/smollm2-lora my-adapter
"""

import sys

from lars_ort import Trainer

bundle, adapter_dir = sys.argv[1], sys.argv[2]
trainer = Trainer(bundle)  # loads the ORT training session; no torch anywhere
notes = ["Meeting moved to Thursday at 10.", "Remember: the garden gate sticks in wet weather."]
batch = trainer.text_batch(notes)
before = trainer.evaluate([batch])["eval_loss"]
for step in range(5):
    loss = trainer.step(batch, lr=1e-3)  # one AdamW step on the batch
after = trainer.evaluate([batch])["eval_loss"]
print(f"loss on the notes: {before:.3f} -> {after:.3f}")
trainer.export_adapter(adapter_dir)  # adapter_config.json + adapter_model.safetensors for PEFT
