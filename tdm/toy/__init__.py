"""The 2-D toy: Gaussian mixture, MLP ε-denoiser, teacher pre-training and evaluation by SWD and unbiased MMD².

    mixture.py   GaussianMixture
    network.py   ToyDenoiser (the MLP ε-denoiser)
    teacher.py   teacher pre-training by denoising score matching, and the cached teacher folder
                 (`python -m tdm.toy.teacher --config configs/toy2d.yaml`)
    evaluate.py  ground truth, sampling the student and the teacher, the SWD and MMD² tables,
                 figure, markdown

The TDM backbone adapter around them is tdm/backbones/toy2d.py (it only loads a teacher folder);
the benchmark job is scripts/toy_benchmark.py. Nothing is imported here, so that
`python -m tdm.toy.teacher` runs the module once.
"""
