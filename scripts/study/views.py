# Views study: the mean embedding of several crops of each photo, nearest class mean.
# Embeddings per view from knn_loo (--save-embeddings /tmp/emb/NAME_<view>):
#   (none) = center crop, flip = --flip, short = --resize 224, shortflip = --resize 224 --flip,
#   zoom = --resize 288, zoomflip = --resize 288 --flip
# Usage: python3 scripts/study/views.py pets c,c+f,s+sf,s+sf+z+zf   (needs numpy)
import numpy as np, sys
exec(open(__file__.replace("views.py", "heads.py")).read().split("heads=sys.argv")[0])
name=sys.argv[1]
X,y,cp=load(name)
V={'c':X}
for v,suf in [('f','flip'),('s','short'),('sf','shortflip'),('z','zoom'),('zf','zoomflip')]:
    try: V[v]=np.fromfile(f'/tmp/emb/{name}_{suf}/embeddings.f32',dtype='<f4').reshape(X.shape).astype(np.float64)
    except Exception: pass
C=y.max()+1; seeds=range(10) if name=='pets' else range(3)
combos=sys.argv[2].split(',')
for combo in combos:
  views=combo.split('+')
  Z=sum(V[v] for v in views)/len(views)
  out=[]
  for k in [1,3,5,8]:
    accs=[]
    for s in seeds:
        tr,te=split(y,k,s)
        A,B=prep(Z[tr],Z[te],False)
        L,M=ncm_logits(A,y[tr],B,C)
        accs.append((L.argmax(1)==y[te]).mean())
    out.append(f'k{k}: {100*np.mean(accs):5.1f}')
  print(combo.ljust(10),'  '.join(out),flush=True)
