export interface Placement { disk: string; offsetBytes: number }      // where an allocation starts on a disk
export type StorageDescriptor =
  | { kind: 'linear'; at: Placement }
  | { kind: 'striped'; stripeBytes: number; columns: Placement[] }
  | { kind: 'mirrored'; sides: Placement[] }
  | { kind: 'striped-mirrored'; stripeBytes: number; columns: Placement[][] /* columns[c][side] */ }
  | { kind: 'journal'; at: Placement; lengthBytes: number };
