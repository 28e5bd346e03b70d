import sys
from max import driver, engine
from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType, ops
from pathlib import Path
g0=DeviceRef.GPU(0); cpu=DeviceRef.CPU()
def attempt(label, scalar_dev, const):
    try:
        its=[TensorType(DType.float32, shape=['M','N'], device=g0), TensorType(DType.float32, shape=['N'], device=g0)]
        if not const: its.append(TensorType(DType.float32, shape=[], device=scalar_dev))
        with Graph('t'+label, input_types=its, custom_extensions=[Path('kernels')]) as g:
            x,w,*e=g.inputs
            if const: e=[ops.constant(1e-5, DType.float32, device=scalar_dev)]
            g.output(*ops.custom('kt.rms_norm', device=g0, values=[x,w,*e], out_types=[TensorType(DType.float32, shape=x.tensor.shape, device=g0)]))
        engine.InferenceSession(devices=[driver.CPU(), driver.Accelerator(0)]).load(g)
        print(label, 'OK', flush=True)
    except Exception as ex:
        print(label, 'ERR', str(ex)[-3000:], flush=True)
attempt('gpu-scalar-input', g0, False)
attempt('cpu-const', cpu, True)
attempt('cpu-scalar-input-2devs', cpu, False)
