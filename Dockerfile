# Processing image with mlproj installed (image route (b) of the SageMaker backend).
#   docker build -t mlproj-processing .
#   docker tag mlproj-processing <account>.dkr.ecr.<region>.amazonaws.com/mlproj-processing:latest
#   docker push <account>.dkr.ecr.<region>.amazonaws.com/mlproj-processing:latest
#   mlproj job run batch_inference --backend sagemaker --image-uri <that URI> --role ... --bucket ...
# The job's entry.py (shipped in the code channel) finds mlproj installed and runs the step directly.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MPLBACKEND=Agg
WORKDIR /opt/mlproj
COPY settings.ini setup.py README.md ./
COPY mlproj ./mlproj
RUN pip install . && python -m ipykernel install --sys-prefix --name python3 && python -c "import mlproj.runner, mlproj.steps"
ENTRYPOINT ["python3"]
