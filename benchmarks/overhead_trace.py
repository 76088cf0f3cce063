"""Where the overhead of benchmarks/overhead.py's workload goes: one sweep (the product's path, or plain
Tune with actor reuse given ``plain``) with driver-side timestamps: when Tuner.fit is called, when Tune asks
Ray for the trial actors, when each trial starts (Tune callback), each result, each completion.

    python benchmarks/overhead_trace.py          # sweeper (runner.run_sweep)
    python benchmarks/overhead_trace.py plain    # plain Ray Tune, reuse_actors=True
"""
import sys, time, json, os, tempfile, statistics
from pathlib import Path as _P
sys.path.insert(0, str(_P(__file__).resolve().parents[1]))


def main() -> None:
    import benchmarks.overhead as oh
    import ray, yaml
    from pathlib import Path
    tmp = tempfile.mkdtemp()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    from ray import tune
    from ray.tune import Callback
    ev=[]
    class CB(Callback):
        def on_trial_start(self, iteration, trials, trial, **info): ev.append((time.time(),'start',trial.trial_id))
        def on_trial_result(self, iteration, trials, trial, result, **info): ev.append((time.time(),'result',trial.trial_id))
        def on_trial_complete(self, iteration, trials, trial, **info): ev.append((time.time(),'complete',trial.trial_id))
    cb=CB()
    orig = tune.RunConfig.__init__
    def with_cb(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [cb]; orig(self, *a, **k)
    tune.RunConfig.__init__ = with_cb
    plain = len(sys.argv)>1
    import ray.actor
    _rem = ray.actor.ActorClass._remote
    ACT=[]
    def _remote(self, *a, **k):
        ACT.append(time.time()); return _rem(self, *a, **k)
    ray.actor.ActorClass._remote = _remote
    from ray.tune.execution.tune_controller import TuneController
    _step = TuneController.step
    STEP=[]
    def step(self):
        STEP.append(time.time()); return _step(self)
    TuneController.step = step

    _fit = tune.Tuner.fit
    FIT=[]
    def fit(self, *a, **k):
        FIT.append(time.time()); return _fit(self, *a, **k)
    tune.Tuner.fit = fit

    t0 = time.time()
    if not plain:
        from sweeper import manifest, runner
        p = Path(tmp) / "m.yaml"; p.write_text(yaml.safe_dump(oh._manifest(tmp)))
        loaded = manifest.load(p)
        t0 = time.time()
        sweep_dir, rows = runner.run_sweep(loaded, quiet=True, dashboard=False)
    else:
        def trainable(config):
            for i in range(5):
                time.sleep(0.2)
                tune.report({"val_loss": config["lr"] / (i + 1), "epoch": i + 1})
        tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space={"lr": tune.loguniform(1e-4, 1e-2)},
            tune_config=tune.TuneConfig(num_samples=40, metric="val_loss", mode="min", reuse_actors=True),
            run_config=tune.RunConfig(storage_path=tmp, name="plain", verbose=0))
        t0=time.time(); tuner.fit()
    wall=time.time()-t0
    print('wall %.2f' % wall); print('actors requested at', [round(a-t0,2) for a in ACT[:4]]); print('first controller step +%.2f, steps before first start: %d' % (STEP[0]-t0, sum(1 for x in STEP if x < min(t for t,k,i in ev if k=='start')))); print('fit called at +%.2f' % (FIT[0]-t0))
    st={}; res={}; comp={}
    for t,k,i in ev:
        if k=='start': st.setdefault(i,t)
        elif k=='result': res.setdefault(i,[]).append(t)
        else: comp[i]=t
    first=min(st.values()); print('first trial start +%.2f, first result +%.2f' % (first-t0, min(min(v) for v in res.values())-t0))
    print('last complete +%.2f' % (max(comp.values())-t0))
    # per trial: start->first result, result intervals, last result->complete
    s2r=[res[i][0]-st[i] for i in st if i in res]
    iv=[b-a for i in res for a,b in zip(res[i],res[i][1:])]
    r2c=[comp[i]-res[i][-1] for i in comp if i in res]
    print('start->first result median %.3f  result interval median %.3f mean %.3f  last result->complete median %.3f' % (statistics.median(s2r), statistics.median(iv), statistics.fmean(iv), statistics.median(r2c)))
    # complete -> next start (global sorted)
    cs=sorted(comp.values()); ss=sorted(st.values())
    # pair each start (after first 2) with the latest completion before it
    gaps=[]
    for s in ss[2:]:
        prev=[c for c in cs if c<=s]
        if prev: gaps.append(s-prev[-1])
    print('complete->next start median %.3f sum %.2f' % (statistics.median(gaps), sum(gaps)))


if __name__ == "__main__":
    main()
