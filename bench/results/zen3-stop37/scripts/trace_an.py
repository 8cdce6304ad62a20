import glob, sys, collections
for k in sys.argv[1:]:
    ev=[]
    for f in glob.glob(f'/tmp/tr_k{k}.*'):
        for line in open(f):
            t,n=line.split(); ev.append((float(t),n))
    ev.sort()
    gaps=collections.defaultdict(list)
    for (t0,a),(t1,b) in zip(ev,ev[1:]):
        gaps[(a,b)].append((t1-t0)*1e3)
    print('k',k, len(ev))
    for (a,b),v in sorted(gaps.items(), key=lambda x:-len(x[1])):
        if len(v)<50: continue
        v.sort(); print(f'  {a:>10} -> {b:<10} n={len(v):5d} mean={sum(v)/len(v):6.2f} med={v[len(v)//2]:6.2f} ms')
