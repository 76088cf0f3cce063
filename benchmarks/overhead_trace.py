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
    plain = len(sys.argv)>1
    if plain:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    else:  # as python -m sweeper starts Ray (benchmarks/overhead.py does the same)
        from sweeper import runner
        runner.init_ray(None, num_cpus=2, dashboard=False)
    from ray import tune
    from ray.tune import Callback
    ev=[]; W=[]; RP=[]
    class CB(Callback):
        def on_trial_start(self, iteration, trials, trial, **info): ev.append((time.time(),'start',trial.trial_id))
        def on_trial_result(self, iteration, trials, trial, result, **info): ev.append((time.time(),'result',trial.trial_id)); W.append((trial.trial_id, result.get('pid'), result.get('t_trial_begin'), result.get('t_report'), time.time())); RP.append((trial.trial_id, result.get('pid'), result.get('report_prev_s'), result.get('t_report')))
        def on_trial_complete(self, iteration, trials, trial, **info): ev.append((time.time(),'complete',trial.trial_id))
    cb=CB()
    orig = tune.RunConfig.__init__
    def with_cb(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [cb]; orig(self, *a, **k)
    tune.RunConfig.__init__ = with_cb
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
        FIT.append(time.time())
        try:
            return _fit(self, *a, **k)
        finally:
            FIT.append(time.time())
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
    print('wall %.2f' % wall); print('actors requested at', [round(a-t0,2) for a in ACT[:4]]); print('first controller step +%.2f, steps before first start: %d' % (STEP[0]-t0, sum(1 for x in STEP if x < min(t for t,k,i in ev if k=='start')))); print('fit called at +%.2f, returned at +%.2f' % (FIT[0]-t0, FIT[-1]-t0))
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
    if W and W[0][2]:  # the sleep trainable's own clock (epoch seconds), per worker process
        byw = {}
        for tid, pid, tb, tr, td in W:
            byw.setdefault(pid, {}).setdefault(tid, []).append((tb, tr, td))
        for pid, trials in byw.items():
            seq = sorted(trials.values(), key=lambda v: v[0][0])
            begins = [v[0][0] for v in seq]
            print('worker %s: %d trials, first trial_fn entry +%.2f, last report +%.2f' % (pid, len(seq), begins[0]-t0, seq[-1][-1][1]-t0))
            body = [v[-1][1]-v[0][0] for v in seq]  # trial_fn entry -> its last report
            between = [b[0][0]-a[-1][1] for a, b in zip(seq, seq[1:])]  # last report -> next trial_fn entry
            lag = [td-tr for v in seq for _, tr, td in v]  # report in worker -> driver callback
            print('  entry->last report median %.3f mean %.3f max %.3f (5 x 0.2 s = 1.000)  last report->next entry median %.3f mean %.3f max %.3f  report->driver median %.3f' % (
                statistics.median(body), statistics.fmean(body), max(body), statistics.median(between), statistics.fmean(between), max(between), statistics.median(lag)))
            # the path from a trial's last report to the next trial's entry on this worker
            seqk = sorted(trials, key=lambda k: trials[k][0][0])
            legs = []
            for ka, kb in zip(seqk, seqk[1:]):
                last_rep = trials[ka][-1][1]; got = trials[ka][-1][2]
                c = comp.get(ka); s_ = st.get(kb); e = trials[kb][0][0]
                if c and s_:
                    legs.append((got - last_rep, c - got, s_ - c, e - s_))
            if legs:
                print('  last report->driver got it %.4f, ->complete %.4f, ->next start %.4f, ->next entry %.4f (medians)' % tuple(
                    statistics.median(x[i] for x in legs) for i in range(4)))
            print('  bodies', ' '.join('%.3f' % b for b in body))
            firsttid = min(trials, key=lambda k: trials[k][0][0])
            print('  first trial: report durations (previous report, s)', [round(x[2] or 0, 3) for x in RP if x[0] == firsttid])
            print('  between', ' '.join('%.3f' % b for b in between))


if __name__ == "__main__":
    main()
