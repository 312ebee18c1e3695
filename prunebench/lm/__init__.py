"""Language models: Hugging Face causal LMs pruned after training, scored by perplexity.

The recipe of SparseGPT's and Wanda's scripts (recipe.py): load a pretrained causal LM and its
tokenizer (hub.py), tokenise the evaluation text and a seeded sample of calibration windows
(text.py), measure the dense perplexity, prune the Linear layers of the decoder blocks one
block at a time on the device (blockwise.py), measure the pruned perplexity, optionally fine-tune
with the masks held (fp32 master weights, masks packed to a bit per weight: packed.py), and save a
Hugging Face checkpoint directory. A stopped run resumes from its last pruned block (resume.py).
"""
