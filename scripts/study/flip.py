# Flip augmentation study: also run knn_loo with --flip --save-embeddings /tmp/emb/pets_flip.
# Usage: python3 scripts/study/flip.py   (from this folder; needs numpy)
import numpy as np, sys
exec(open(__file__.replace("flip.py", "heads.py")).read().split("heads=sys.argv")[0])
X,y,cp=load('pets'); Xf=np.fromfile('/tmp/emb/pets_flip/embeddings.f32',dtype='<f4').reshape(X.shape).astype(np.float64)
C=y.max()+1
for mode in ['plain','tta','aug','aug+tta']:
  out=[]
  for k in [1,3,5,8]:
    accs=[]
    for s in range(10):
        tr,te=split(y,k,s)
        Xtr=X[tr]; ytr=y[tr]; Xte=X[te]
        if 'aug' in mode: Xtr=np.concatenate([X[tr],Xf[tr]]); ytr=np.concatenate([y[tr],y[tr]])
        if 'tta' in mode: Xte=(X[te]+Xf[te])/2
        A,B=prep(Xtr,Xte,False)
        L,M=ncm_logits(A,ytr,B,C)
        accs.append((L.argmax(1)==y[te]).mean())
    out.append(f'k{k}: {100*np.mean(accs):5.1f}±{100*np.std(accs):.1f}')
  print(mode.ljust(8),'  '.join(out))
