"""Quick start: the README example, runnable as ``python examples/quickstart.py`` (about 30 s)."""

import arviz as az
import jax
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

import numpyro_mpe as mpe
from numpyro_mpe.io.datasets import load_stackloss

numpyro.enable_x64()          # accuracy; float32 works too (see below)

df = load_stackloss()
X = df[["Air.Flow", "Water.Temp", "Acid.Conc."]].to_numpy(float)
X = (X - X.mean(0)) / X.std(0)
y = df["stack.loss"].to_numpy(float)

def model(X, y=None):
    alpha = numpyro.sample("alpha", dist.Normal(20, 20))
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)

fit = mpe.Laplace(model).run(jax.random.PRNGKey(0), X, y=y)  # args/kwargs go to the model unchanged
sens = fit.sensitivities()        # xarray.Dataset over the plate dim "obs"
print(sens.sensitivity.to_series().nlargest(3))
elpd = fit.loo()                  # arviz ELPDData: az.compare / az.plot_compare accept it
idata = fit.to_inference_data()   # posterior, log_likelihood, observed_data + the "mpe" group

mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=1000)
mcmc.run(jax.random.PRNGKey(1), X, y=y)
idata_nuts = az.from_numpyro(mcmc, log_likelihood=True)
table = mpe.compare_psis(fit, idata=idata_nuts)   # MPE vs arviz.loo (PSIS-LOO) per observation
print(table.attrs["summary"])
check = mpe.exact_loo(fit, [20])  # brute-force refit without observation 20: the ground truth
