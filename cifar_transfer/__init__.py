"""cifar-transfer: input normalization is a contract with the pretrained model.

Modules, one job each, by layer (lower layers never import higher ones):

The contract and the model
- ``contract``     the normalization contract, its presets and the named wrong variants
- ``backbones``    pretrained backbones, each declaring its contract
- ``checkpoint``   the checkpoint folder: file names, limits, validation, atomic writes
- ``model``        the classifier and its self-describing checkpoint folder
- ``hub_refs``     what a reference can be (repo-id syntax) and why the Hub cannot give it
- ``hub``          a checkpoint reference resolved: a local folder or a Hugging Face Hub repo id
- ``card``         the model card, generated from a checkpoint's own files
- ``publish``      ``python -m cifar_transfer.publish``: one commit to the Hub

Images and data
- ``images``       one image pipeline: any input to RGB pixels, then the model's contract
- ``data``         datasets decoded once into uint8 tensors; batched augmentation

Running a network
- ``runtime``      device choice and a description of the machine
- ``engine``       inference engines (ONNX Runtime, PyTorch) for the app and the meter
- ``inference``    the frozen prefix runner and the one flip test-time augmentation

Training (one engine)
- ``training``     the one step loop, optimizer, schedule and frozen/trainable split
- ``batches``      the batch sources: augmented images, or cached features of a frozen prefix
- ``finetune``     a fine-tuning run part by part; ``train`` is its command line
- ``evaluate``     ``python -m cifar_transfer.evaluate``: accuracy under every variant

Instruments
- ``divergence`` D: how far a batch-norm layer's input sits from its running statistics
- ``meter``        the contract meter: do a network's inputs look like its batch-norm statistics?
- ``meter_fit``    fitting the meter's calibration (``python -m cifar_transfer.meter``)
- ``doctor``       ``python -m cifar_transfer.doctor``: which normalization do these weights expect?
- ``doctor_evidence`` the doctor's evidence: candidates, per-image misfits, what the images separate
- ``doctor_images`` the pictures the doctor reads

The study of training under wrong normalization
- ``study``        ``python -m cifar_transfer.study``: runs the cells (resumable)
- ``study_results`` the cells as data: regimes, the results file, statistics
- ``study_report`` tables, verdicts and plots from the cells
- ``experiment``   the quick per-step experiment, on the same engine

The app (Gradio code lives only here and in ``app.py``)
- ``predictor``    what the app runs: read an image safely, classify it under every variant
- ``gradio_inputs`` the app's input components, with the checks the app controls
- ``uploads``      which paths the app may open; the upload folder's disk bound
- ``http_limits``  request body limits, as an ASGI middleware
- ``sessions``     what a visitor's session may keep on the server
- ``study_tab``    the app's page on the study and the experiment
- ``cli``          the help formatter every command line shares
"""

__version__ = "0.1.0"
