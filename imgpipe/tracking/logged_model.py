"""The logged MLflow model's code (MLflow's "models from code"): MLflow copies this file into
every logged model and runs it when it loads one, instead of unpickling an object. It builds the
pyfunc from the imgpipe package bundled beside it (the model's code/imgpipe/); the weights and
meta.json are the model's artifacts. Nothing imports this module.
"""

import mlflow.models

from imgpipe.tracking.pyfunc import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
